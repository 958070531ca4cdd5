"""`prompt` and `prompt-deep`: local learned prompt tokens (VPT, Jia et al., ECCV 2022; pFedPT, pFedPG).

`embed:prompt` inserts `tokens` prompt tokens after the class (and register / distillation) tokens, before
the first block (VPT-shallow); `attn:prompt-deep` (or `attn@9-11:prompt-deep`) gives each of the term's blocks
its own tokens: inserted before the first of them, replaced before each later one (VPT-deep). The prompt
outputs are dropped before the final norm, so pooling and the head see the model's own tokens. Each block's
tokens live at `<block>.prompt.tokens` (part `plugin`), local.

Where tokens can go: timm's VisionTransformer (ViT, DeiT, DeiT III, distilled DeiT), whose blocks take a
sequence `[prefix tokens, patch tokens]`. Swin's blocks take a spatial grid of windows, EVA and BEiT add
rotary / relative position terms per patch, and CaiT adds its class token only in its class-attention blocks:
none of them has a place for extra tokens, and asking for prompts there is one clear error.

Unlike LoRA and the adapters, prompts cannot start as the plain model: attention gives any token some weight,
so the tokens start small (normal, std 0.02, seeded) rather than at zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from fedsens.personalize import families
from fedsens.personalize.errors import UserError
from fedsens.personalize.mechanisms.registry import Mechanism, Placed, refuse, register

PROMPT_FAMILIES = ("vit", "deit-distilled")


class PromptTokens(nn.Module):
    """One block's prompt tokens and the hooks that put them into the token sequence."""

    fedsens_part = "plugin"

    def __init__(self, count: int, dim: int, offset: int, generator: torch.Generator, dtype: torch.dtype):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(count, dim, generator=generator, dtype=dtype) * 0.02)
        self.offset = offset  # the model's prefix tokens (class, registers, distillation) stay first

    def _prompts(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens.to(x.dtype).expand(x.shape[0], -1, -1)

    def insert(self, _block: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (torch.cat([x[:, : self.offset], self._prompts(x), x[:, self.offset :]], dim=1), *args[1:])

    def replace(self, _block: nn.Module, args: tuple) -> tuple:
        x, end = args[0], self.offset + self.tokens.shape[0]
        return (torch.cat([x[:, : self.offset], self._prompts(x), x[:, end:]], dim=1), *args[1:])

    def remove(self, _norm: nn.Module, args: tuple) -> tuple:
        x, end = args[0], self.offset + self.tokens.shape[0]
        return (torch.cat([x[:, : self.offset], x[:, end:]], dim=1), *args[1:])


@dataclass(frozen=True)
class PromptOptions:
    tokens: int = field(default=4, metadata={"help": "prompt tokens per block"})

    def __post_init__(self):
        if self.tokens < 1:
            raise UserError(f"mechanism prompt option tokens must be at least 1 (got {self.tokens})")


def install_prompts(model: nn.Module, blocks: list[int], options: PromptOptions, generator) -> list[str]:
    family = families.of(model)
    if family.name not in PROMPT_FAMILIES:
        raise UserError(
            f"prompt tokens fit ViT / DeiT models only ({family.name} blocks have no place for extra tokens); "
            "use lora, bias, adapter or full there"
        )
    vit: Any = model  # a timm VisionTransformer (its family checked above)
    paths = [path for path, _ in family.blocks(model)]
    modules = dict(model.named_modules())
    dtype = vit.pos_embed.dtype if isinstance(getattr(vit, "pos_embed", None), torch.Tensor) else torch.float32
    added = []
    first: PromptTokens | None = None
    for block in blocks:
        host = modules[paths[block]]
        if hasattr(host, "prompt"):
            raise UserError(f"{paths[block]} would get prompt tokens twice; name each block in one prompt term")
        prompt = PromptTokens(options.tokens, int(vit.embed_dim), int(vit.num_prefix_tokens), generator, dtype)
        host.add_module("prompt", prompt.to(next(host.parameters()).device))
        host.register_forward_pre_hook(prompt.replace if first is not None else prompt.insert)
        first = first or prompt
        added.append(f"{paths[block]}.prompt.tokens")
    assert first is not None
    vit.norm.register_forward_pre_hook(first.remove)
    return added


@register
class Prompt(Mechanism):
    Options = PromptOptions
    name = "prompt"
    summary = "local prompt tokens after the embedding (VPT-shallow); takes the embed term"

    def install(self, model: nn.Module, selected: pd.DataFrame, generator: torch.Generator) -> Placed:
        if set(selected["part"].astype(str)) != {"embed"}:
            raise refuse(self.name, selected, "shallow prompts go after the embedding: write embed:prompt")
        added = install_prompts(model, [0], self.options, generator)
        return Placed(local=tuple(added), added=tuple(added))


@register
class PromptDeep(Mechanism):
    Options = PromptOptions
    name = "prompt-deep"
    summary = "local prompt tokens at every block of the term (VPT-deep); takes attn terms"

    def install(self, model: nn.Module, selected: pd.DataFrame, generator: torch.Generator) -> Placed:
        if set(selected["part"].astype(str)) != {"attn"}:
            raise refuse(self.name, selected, "deep prompts enter each block's attention: write attn:prompt-deep")
        blocks = sorted({int(b) for b in selected["block"] if int(b) >= 0})
        added = install_prompts(model, blocks, self.options, generator)
        return Placed(local=tuple(added), added=tuple(added))
