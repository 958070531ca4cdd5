"""Attention plugins: FedPerfix adapter prefixes, vanilla prefixes and classic prefix tokens.

`install(model, kind)` swaps every (or the last `depth`) timm `Attention` module of a ViT for a
`AttentionWithPlugin` that *reuses* the original's child modules — the same `qkv`, `proj`, norms and
dropouts, hence the same Parameter objects and the same parameter names
(`blocks.K.attn.qkv.weight` ...) — and adds one plugin submodule, `blocks.K.attn.prefix`.
Aggregation and part specs key on parameter names, so nothing outside the plugin changes.

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
- `prefix-tokens`: classic prefix-tuning — `length` learnable key and value vectors per head,
  concatenated to the (normalised) keys and values; zero-initialised or N(0, 0.02) ("random").

Initialisation draws from a `torch.Generator` seeded by `seed`, never from the global RNG.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from fedsens.personalize.errors import UserError

KINDS = ("fedperfix", "vanilla-prefix", "prefix-tokens")
INITS = ("zero", "random")


def _default_linear_init(linear: nn.Linear, generator: torch.Generator) -> None:
    """PyTorch's own nn.Linear init (kaiming-uniform weight, fan-in uniform bias), seeded."""
    nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
    if linear.bias is not None:
        bound = 1.0 / math.sqrt(linear.in_features)
        nn.init.uniform_(linear.bias, -bound, bound, generator=generator)


def _attn_dim(attn: Attention) -> int:
    return getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)  # older timm lacks attn_dim


class AttentionPlugin(nn.Module):
    """A plugin's two hooks into the attention; each default leaves the attention unchanged."""

    fedsens_part = "plugin"

    def shift_projection(self, qkv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Change the `qkv` projection output (B x N x 3*attn_dim) computed from tokens `x`."""
        return qkv

    def extend(self, k, v, attn_mask, is_causal):
        """Change the per-head keys and values (B x H x N x hd) and the mask that goes with them."""
        return k, v, attn_mask, is_causal


class KeyValueOffsets(AttentionPlugin):
    """Base of the additive plugins: per-token offsets added to keys and values, times `scale`."""

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


class PrefixAdapter(KeyValueOffsets):
    """FedPerfix's local adapter: down-projection, tanh, up-projection to key and value offsets."""

    def __init__(self, dim: int, attn_dim: int, mid_dim: int, scale: float, generator: torch.Generator) -> None:
        super().__init__(scale)
        self.down = nn.Linear(dim, mid_dim)
        self.up = nn.Linear(mid_dim, 2 * attn_dim)
        _default_linear_init(self.down, generator)
        _default_linear_init(self.up, generator)

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
            _default_linear_init(self.proj, generator)

    def offsets(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class PrefixTokens(AttentionPlugin):
    """Classic prefix-tuning: `length` learnable key and value vectors per head, prepended."""

    def __init__(self, num_heads: int, head_dim: int, length: int, init: str, generator: torch.Generator) -> None:
        super().__init__()
        shape = (num_heads, length, head_dim)
        if init == "zero":
            keys, values = torch.zeros(shape), torch.zeros(shape)
        else:
            keys = torch.randn(shape, generator=generator) * 0.02
            values = torch.randn(shape, generator=generator) * 0.02
        self.keys = nn.Parameter(keys)
        self.values = nn.Parameter(values)

    def extend(self, k, v, attn_mask, is_causal):
        """Prepend the prefix to keys and values (B x H x N x hd); every query may attend to it."""
        batch, _, tokens, _ = k.shape
        length = self.keys.shape[1]
        k = torch.cat([self.keys.to(k.dtype).expand(batch, -1, -1, -1), k], dim=2)
        v = torch.cat([self.values.to(v.dtype).expand(batch, -1, -1, -1), v], dim=2)
        if is_causal:  # SDPA's is_causal would align the triangle to the prefix: make it explicit
            attn_mask = torch.ones(tokens, tokens, dtype=torch.bool, device=k.device).tril()
        if attn_mask is not None:
            visible = True if attn_mask.dtype == torch.bool else 0.0
            pad = attn_mask.new_full((*attn_mask.shape[:-1], length), visible)
            attn_mask = torch.cat([pad, attn_mask], dim=-1)
        return k, v, attn_mask, False


class AttentionWithPlugin(nn.Module):
    """timm's multi-head self-attention with a plugin; shares (not copies) the original's modules.

    Child names equal timm's (`qkv`, `q_norm`, `k_norm`, `attn_drop`, `norm`, `gate`, `proj`,
    `proj_drop`), so parameter names are unchanged; the plugin lives at `prefix`.
    """

    def __init__(self, original: Attention, prefix: AttentionPlugin) -> None:
        super().__init__()
        self.num_heads = original.num_heads
        self.head_dim = original.head_dim
        self.attn_dim = _attn_dim(original)
        self.scale = original.scale
        self.fused_attn = original.fused_attn
        self.qkv = original.qkv
        self.q_norm = original.q_norm
        self.k_norm = original.k_norm
        self.attn_drop = original.attn_drop
        self.norm = getattr(original, "norm", nn.Identity())
        self.gate = getattr(original, "gate", None)
        self.proj = original.proj
        self.proj_drop = original.proj_drop
        self.prefix = prefix

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.prefix.shift_projection(self.qkv(x), x)
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        k, v, attn_mask, is_causal = self.prefix.extend(k, v, attn_mask, is_causal)
        dropout = self.attn_drop.p if self.training else 0.0
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal)
        else:
            x = self._unfused(q, k, v, attn_mask, is_causal)
        x = x.transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def _unfused(self, q, k, v, attn_mask, is_causal):
        scores = (q * self.scale) @ k.transpose(-2, -1)
        if is_causal:
            attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        elif attn_mask is not None:
            scores = scores + attn_mask
        return self.attn_drop(scores.softmax(dim=-1)) @ v


def _check_options(kind: str, *, mid_dim: int, depth: int | None, init: str, length: int, available: int) -> None:
    if kind not in KINDS:
        raise UserError(f"unknown plugin {kind!r}; choose one of {', '.join(KINDS)}")
    if available == 0:
        raise UserError("the model has no timm Attention module to plug into; build a timm ViT")
    if depth is not None and not 1 <= depth <= available:
        raise UserError(f"plugin depth {depth} is out of range; give 1..{available} (the model's attention layers)")
    if mid_dim < 1:
        raise UserError(f"plugin mid_dim {mid_dim} must be at least 1")
    if length < 1:
        raise UserError(f"prefix length {length} must be at least 1")
    if init not in INITS:
        raise UserError(f"unknown plugin init {init!r}; choose zero or random")


def _make_prefix(kind: str, attn: Attention, *, mid_dim, scale, init, length, generator) -> AttentionPlugin:
    dim, attn_dim = attn.qkv.in_features, _attn_dim(attn)
    if kind == "fedperfix":
        return PrefixAdapter(dim, attn_dim, mid_dim, scale, generator)
    if kind == "vanilla-prefix":
        return LinearPrefix(dim, attn_dim, init, scale, generator)
    return PrefixTokens(attn.num_heads, attn.head_dim, length, init, generator)


def install(
    model: nn.Module,
    kind: str,
    *,
    mid_dim: int = 256,
    scale: float = 1.5,
    depth: int | None = None,
    init: str = "zero",
    length: int = 8,
    seed: int = 0,
) -> list[str]:
    """Plug `kind` into the last `depth` (default: all) attention layers of `model`, in place.

    Returns the names of the parameters added (all under `<attention>.prefix.`). The original
    parameters keep their names and identities. A model that already has plugins is refused.
    """
    if any(isinstance(module, AttentionWithPlugin) for module in model.modules()):
        raise UserError("the model already has attention plugins; install them once, on a fresh model")
    attentions = [name for name, module in model.named_modules() if isinstance(module, Attention)]
    _check_options(kind, mid_dim=mid_dim, depth=depth, init=init, length=length, available=len(attentions))
    generator = torch.Generator().manual_seed(seed)
    before = {name for name, _ in model.named_parameters()}
    for name in attentions[len(attentions) - (depth or len(attentions)) :]:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        original = getattr(parent, child_name)
        prefix = _make_prefix(
            kind, original, mid_dim=mid_dim, scale=scale, init=init, length=length, generator=generator
        )
        weight = original.qkv.weight
        setattr(parent, child_name, AttentionWithPlugin(original, prefix.to(device=weight.device, dtype=weight.dtype)))
    return [name for name, _ in model.named_parameters() if name not in before]
