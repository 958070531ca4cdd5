"""Attention plugins: FedPerfix adapter prefixes and vanilla prefixes, added to timm's own attention.

`install(model, kind)` gives every selected attention module (each block's `attn`, in depth order, as
the model's family lists them: `personalize.families`) a plugin submodule at `<attention>.prefix`
(`blocks.K.attn.prefix.down.weight` ...) and forward hooks on its key/value projections that add the
plugin's scaled key and value offsets to the projections' outputs:

- a fused `qkv` Linear (ViT, DeiT, Swin and Swin V2 window attention, BEiT, EVA, CaiT's talking-heads
  attention): one hook adds the offsets to its key and value thirds. Where the attention adds its
  q/v biases inside one `F.linear` call (Swin V2, BEiT, EVA with `q_bias`/`v_bias`) the plugin sets
  timm's own `qkv_bias_separate` switch, so the projection runs through the `qkv` module (whose hook
  fires) and the biases are added after it: the same sum;
- separate projections (EVA's `q_proj/k_proj/v_proj`, CaiT's class attention `q/k/v`): one hook on
  the key projection, one on the value projection, each adding its half (queries untouched).

timm's attention forward (fused attention kernel included) runs unchanged, and no existing parameter
is renamed or replaced, so aggregation and part specs (which key on names) see only the new plugin.

Plugin modules carry `fedsens_part = "plugin"`, which `personalize.model.parts` honours, so the
part spec "plugin" selects exactly their parameters.

Kinds:
- `fedperfix`: `down = Linear(dim, mid_dim)`, tanh, `up = Linear(mid_dim, 2*dim)` on the attention's
  input tokens gives per-token key and value offsets; `k += scale * k_off`, `v += scale * v_off`,
  queries untouched (FedPerfix, Sun et al. ICCV 2023; defaults from the public code: mid_dim 256,
  scale 1.5, all blocks, PyTorch's default Linear init). The offsets are added to the `qkv`
  projection's key and value outputs, i.e. before timm's optional `k_norm` (a parallel adapter
  on the key/value projection, as the public code places it).
- `vanilla-prefix`: the same offsets from one `Linear(dim, 2*dim)`, initialised to zero (the
  plugged model starts as the plain one) or by PyTorch's default Linear init ("random").

Initialisation draws from a `torch.Generator` seeded by `seed`, never from the global RNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedsens.personalize import families
from fedsens.personalize.blocks import resolve_blocks
from fedsens.personalize.errors import UserError

KINDS = ("fedperfix", "vanilla-prefix")
INITS = ("zero", "random")


def default_linear_init(linear: nn.Linear, generator: torch.Generator) -> None:
    """PyTorch's own nn.Linear init (kaiming-uniform weight, fan-in uniform bias), seeded."""
    nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
    if linear.bias is not None:
        bound = 1.0 / math.sqrt(linear.in_features)
        nn.init.uniform_(linear.bias, -bound, bound, generator=generator)


@dataclass(frozen=True)
class Projections:
    """Where an attention module projects its tokens to keys and values."""

    fused: nn.Linear | None  # one Linear giving queries, keys and values (in thirds)
    key: nn.Linear | None  # or separate key and value Linears
    value: nn.Linear | None

    @property
    def dim(self) -> int:
        linear = self.fused if self.fused is not None else self.key
        assert linear is not None
        return linear.in_features

    @property
    def attn_dim(self) -> int:
        if self.fused is not None:
            return self.fused.out_features // 3
        assert self.key is not None
        return self.key.out_features


def projections(attn: nn.Module) -> Projections | None:
    """The key/value projections of a timm attention module, or None where it has none we know."""
    fused = getattr(attn, "qkv", None)
    if isinstance(fused, nn.Linear):
        return Projections(fused, None, None)
    for key, value in (("k_proj", "v_proj"), ("k", "v")):
        k, v = getattr(attn, key, None), getattr(attn, value, None)
        if isinstance(k, nn.Linear) and isinstance(v, nn.Linear):
            return Projections(None, k, v)
    return None


class KeyValueOffsets(nn.Module):
    """Base of the plugins: per-token offsets added to the keys and values, times `scale`."""

    fedsens_part = "plugin"

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def offsets(self, x: torch.Tensor) -> torch.Tensor:
        """B x N x dim tokens -> B x N x 2*attn_dim (key half, then value half)."""
        raise NotImplementedError

    def shift_projection(self, qkv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Add the scaled offsets to the key and value thirds of the `qkv` projection output."""
        key_value = self.offsets(x) * self.scale
        zero_query = key_value.new_zeros(*key_value.shape[:-1], key_value.shape[-1] // 2)
        return qkv + torch.cat([zero_query, key_value], dim=-1)

    def qkv_hook(self, _qkv: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the attention's `qkv` Linear: its input tokens in, the shifted projection out.

        A bound method, so a deep copy of the model re-binds the hook to the copied plugin."""
        return self.shift_projection(output, args[0])

    def key_hook(self, _k: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on a separate key projection: the key half of the offsets added."""
        offsets = self.offsets(args[0]) * self.scale
        return output + offsets[..., : offsets.shape[-1] // 2]

    def value_hook(self, _v: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on a separate value projection: the value half of the offsets added."""
        offsets = self.offsets(args[0]) * self.scale
        return output + offsets[..., offsets.shape[-1] // 2 :]


class PrefixAdapter(KeyValueOffsets):
    """FedPerfix's local adapter: down-projection, tanh, up-projection to key and value offsets."""

    def __init__(self, dim: int, attn_dim: int, mid_dim: int, scale: float, generator: torch.Generator) -> None:
        super().__init__(scale)
        self.down = nn.Linear(dim, mid_dim)
        self.up = nn.Linear(mid_dim, 2 * attn_dim)
        default_linear_init(self.down, generator)
        default_linear_init(self.up, generator)

    def offsets(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.tanh(self.down(x)))


class LinearPrefix(KeyValueOffsets):
    """Vanilla prefix: one linear map from the tokens to key and value offsets."""

    def __init__(self, dim: int, attn_dim: int, init: str, scale: float, generator: torch.Generator) -> None:
        super().__init__(scale)
        self.proj = nn.Linear(dim, 2 * attn_dim)
        if init == "zero":
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        else:
            default_linear_init(self.proj, generator)

    def offsets(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _check_options(kind: str, *, mid_dim: int, init: str, available: int) -> None:
    if kind not in KINDS:
        raise UserError(f"unknown plugin {kind!r}; choose one of {', '.join(KINDS)}")
    if available == 0:
        raise UserError("the model has no attention module a plugin fits; build a model of `fedsens models`")
    if mid_dim < 1:
        raise UserError(f"plugin mid_dim {mid_dim} must be at least 1")
    if init not in INITS:
        raise UserError(f"unknown plugin init {init!r}; choose zero or random")


def _make_prefix(kind: str, where: Projections, *, mid_dim, scale, init, generator) -> KeyValueOffsets:
    dim, attn_dim = where.dim, where.attn_dim
    if kind == "fedperfix":
        return PrefixAdapter(dim, attn_dim, mid_dim, scale, generator)
    return LinearPrefix(dim, attn_dim, init, scale, generator)


def install(
    model: nn.Module,
    kind: str,
    *,
    mid_dim: int = 256,
    scale: float = 1.5,
    blocks: str = "all",
    init: str = "zero",
    seed: int = 0,
) -> list[str]:
    """Plug `kind` into the attention layers `blocks` selects (default: all) of `model`, in place.

    Returns the names of the parameters added (all under `<attention>.prefix.`). The original
    parameters keep their names and identities. A model that already has plugins is refused.
    """
    try:
        found = families.of(model).attentions(model)
    except UserError:  # a model no family describes has no attention we know how to plug
        found = []
    attentions = [(name, module) for name, module in found if projections(module)]
    if any(isinstance(getattr(module, "prefix", None), KeyValueOffsets) for _, module in attentions):
        raise UserError("the model already has attention plugins; install them once, on a fresh model")
    _check_options(kind, mid_dim=mid_dim, init=init, available=len(attentions))
    generator = torch.Generator().manual_seed(seed)
    before = {name for name, _ in model.named_parameters()}
    for index in resolve_blocks(blocks, len(attentions), what=f"plugin blocks {blocks!r}"):
        attn = attentions[index][1]
        where = projections(attn)
        assert where is not None
        prefix = _make_prefix(kind, where, mid_dim=mid_dim, scale=scale, init=init, generator=generator)
        weight = (where.fused or where.key).weight  # type: ignore[union-attr]
        attn.add_module("prefix", prefix.to(device=weight.device, dtype=weight.dtype))
        if where.fused is not None:
            if getattr(attn, "q_bias", None) is not None and hasattr(attn, "qkv_bias_separate"):
                attn.qkv_bias_separate = True  # type: ignore[assignment]  # the projection through the qkv module, the biases added after
            where.fused.register_forward_hook(prefix.qkv_hook)
        else:
            assert where.key is not None and where.value is not None
            where.key.register_forward_hook(prefix.key_hook)
            where.value.register_forward_hook(prefix.value_hook)
    return [name for name, _ in model.named_parameters() if name not in before]
