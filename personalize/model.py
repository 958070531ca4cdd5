"""ViT construction (timm) and the layer-type taxonomy: every parameter -> one part and a block index.

Parts are decided by module type and timm's model structure (the classifier module itself, the
patch-embedding module itself, LayerNorm / Attention / Mlp instances), never by loose substrings,
so `head` cannot catch `heads` and a plugin living inside an attention module stays a plugin.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pandas as pd
import timm
import torch
from timm.layers import Mlp
from torch import nn

from fedsens.personalize.blocks import resolve_blocks
from fedsens.personalize.errors import UserError
from fedsens.personalize.schema import PART_TYPES

EMBED_PARAMS = ("cls_token", "pos_embed", "reg_token")


@dataclass(frozen=True)
class ModelShape:
    """A named ViT shape (`--model`), as against a protocol preset (`presets.Preset`, `--preset`).

    `img_size=None` adapts the input size to the data (small CPU shapes)."""

    timm_name: str
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    img_size: int | None = 224
    patch_size: int | None = None
    rgb: bool = True  # paper presets take 3 channels; grey images are repeated


MODEL_SHAPES: dict[str, ModelShape] = {
    "vit_small_patch16_224": ModelShape("vit_small_patch16_224"),
    "vit_tiny_patch16_224": ModelShape("vit_tiny_patch16_224"),
    "vit-mini": ModelShape("vit_small_patch16_224", 192, 6, 3, img_size=None, rgb=False),
    "vit-micro": ModelShape("vit_small_patch16_224", 96, 4, 3, img_size=None, rgb=False),
    # Smaller than anything useful: for tests and smoke runs only.
    "vit-nano": ModelShape("vit_small_patch16_224", 48, 2, 3, img_size=None, rgb=False),
}


@dataclass(frozen=True)
class InputSpec:
    """What the model eats: the data is resized / channel-repeated to this batch by batch."""

    img_size: int
    patch_size: int
    in_chans: int


def input_spec(preset: str, *, data_channels: int, data_size: int) -> InputSpec:
    """Input size for a preset and a dataset.

    Small presets keep small images at their own size (resizing to 32 only what is larger or not a
    multiple of 4) with patch 4. On the 8x8 digits that is 4 tokens of 4x4 pixels: measured on this
    2-core CPU (10 epochs, centralised, AdamW 3e-3), patch 4 reached 0.87 test accuracy against 0.44
    for patch 2 (16 tokens of 2x2 pixels, too little signal per token), in half the time.
    """
    p = model_shape(preset)
    if p.img_size is not None:
        return InputSpec(p.img_size, p.patch_size or 16, 3 if p.rgb else data_channels)
    size = data_size if data_size <= 32 and data_size % 4 == 0 else 32
    return InputSpec(size, 4, data_channels)


def model_shape(name: str) -> ModelShape:
    if name not in MODEL_SHAPES:
        raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(MODEL_SHAPES)}")
    return MODEL_SHAPES[name]


def build(
    preset: str, num_classes: int, in_chans: int, img_size: int, *, patch_size: int | None = None, seed: int = 0
) -> nn.Module:
    """A timm ViT trained from scratch; the init is seeded without touching the global RNG."""
    p = model_shape(preset)
    overrides: dict[str, Any] = {
        k: v for k, v in (("embed_dim", p.embed_dim), ("depth", p.depth), ("num_heads", p.num_heads)) if v is not None
    }
    if patch_size is not None or p.patch_size is not None:
        overrides["patch_size"] = patch_size if patch_size is not None else p.patch_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(
            p.timm_name, pretrained=False, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **overrides
        )


def depth(model: nn.Module) -> int:
    """How many transformer blocks the model has (0 without a `blocks` sequence)."""
    blocks = getattr(model, "blocks", None)
    return len(blocks) if isinstance(blocks, nn.Sequential | nn.ModuleList) else 0


def _part_of_module(model: nn.Module, path: str, module: nn.Module) -> str | None:
    marked = getattr(type(module), "fedsens_part", None)
    if marked is not None:
        return marked
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)) or type(module).__name__ == "RmsNorm":
        return "norm"
    if type(module).__name__.startswith("Attention"):
        return "attn"
    if isinstance(module, Mlp):
        return "mlp"
    if module is getattr(model, "patch_embed", None):
        return "embed"
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is not None and module is get_classifier():
        return "head"
    if re.fullmatch(r"blocks\.\d+\.ls1", path):  # LayerScale belongs to its branch
        return "attn"
    if re.fullmatch(r"blocks\.\d+\.ls2", path):
        return "mlp"
    return None


def _classify(model: nn.Module, name: str, modules: dict[str, nn.Module]) -> str:
    """The part of one parameter: the outermost plugin above it wins, else its innermost typed module."""
    pieces = name.split(".")
    prefixes = [".".join(pieces[:i]) for i in range(1, len(pieces))]
    for prefix in prefixes:  # outermost first: anything under a plugin is plugin
        if getattr(type(modules[prefix]), "fedsens_part", None) == "plugin":
            return "plugin"
    for prefix in reversed(prefixes):  # innermost first
        part = _part_of_module(model, prefix, modules[prefix])
        if part is not None:
            return part
    if name in EMBED_PARAMS:
        return "embed"
    raise ValueError(f"parameter {name!r} belongs to no known part; teach personalize.model about it")


def _block_of(name: str) -> int:
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def parts(model: nn.Module) -> pd.DataFrame:
    """One row per parameter: `param, part, block, numel, bytes`, in the model's order."""
    modules = dict(model.named_modules())
    rows = [
        {
            "param": name,
            "part": _classify(model, name, modules),
            "block": _block_of(name),
            "numel": p.numel(),
            "bytes": p.numel() * p.element_size(),
        }
        for name, p in model.named_parameters()
    ]
    return pd.DataFrame(rows, columns=["param", "part", "block", "numel", "bytes"])


def _match_term(table: pd.DataFrame, term: str, depth: int) -> pd.Series:
    if term == "all":
        return pd.Series(True, index=table.index)
    part, _, blocks = term.partition("@")
    if part in PART_TYPES:
        selected = table["part"] == part
        if blocks:
            selected &= table["block"].isin(resolve_blocks(blocks, depth, what=f"part spec term {term!r}"))
        return selected
    if blocks:
        raise UserError(f"part spec {term!r}: '@blocks' needs a part type ({', '.join(PART_TYPES)})")
    # An explicit module path such as blocks.11 or blocks.3.attn: match on whole dotted components.
    return (table["param"] == term) | table["param"].str.startswith(term + ".")


def resolve(model: nn.Module, spec: str) -> list[str]:
    """The parameter names a part spec keeps local. Every term must match something."""
    table = parts(model)
    terms = [t.strip() for t in str(spec).split(",") if t.strip()]
    if not terms:
        raise UserError("empty part spec; write e.g. 'none', 'head', 'attn,head', 'attn@9-11' or 'blocks.11'")
    if terms == ["none"]:
        return []
    selected = pd.Series(False, index=table.index)
    for term in terms:
        if term == "none":
            raise UserError(f"part spec {spec!r} mixes 'none' with other terms; use 'none' alone")
        matched = _match_term(table, term, depth(model))
        if not matched.any():
            blocks = table.loc[table["block"] >= 0, "block"]
            span = f"blocks 0-{blocks.max()}" if len(blocks) else "no blocks"
            raise UserError(
                f"part spec term {term!r} matches no parameter of this model "
                f"(parts: {', '.join(sorted(set(table['part'])))}; {span})"
            )
        selected |= matched
    return table.loc[selected, "param"].tolist()


def manifest(model: nn.Module, spec: str) -> pd.DataFrame:
    """parts(model) plus a boolean `local` column for the spec."""
    table = parts(model)
    table["local"] = table["param"].isin(set(resolve(model, spec)))
    return table


def describe(table: pd.DataFrame) -> str:
    """A short on-screen summary of a manifest: local vs shared parameters and bytes per part."""

    def side(frame: pd.DataFrame) -> str:
        return f"{int(frame['numel'].sum()):,} params ({int(frame['bytes'].sum()) / 1e6:.2f} MB)"

    local, shared = table[table["local"]], table[~table["local"]]
    kept = ", ".join(f"{part}={int(n):,}" for part, n in local.groupby("part")["numel"].sum().items()) or "nothing"
    return f"local: {side(local)} [{kept}]; shared: {side(shared)}"
