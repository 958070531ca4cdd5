"""`adapter`: a bottleneck adapter beside the part, local; its up-projection starts at zero (`init=zero`), so
the model starts as the plain one.

- `attn`: FedPerfix's key/value adapter (`personalize.plugins`, kind `fedperfix`) in the term's blocks: the sweep
  then places FedPerfix's mechanism as one cell among the others (`init=fedperfix` keeps the public code's
  random init of both projections; the defaults mid 256 and scale 1.5 are its own);
- `mlp`: a parallel adapter beside each selected block's MLP (He et al., ICLR 2022): the MLP's input through
  down, GELU and up, added to the MLP's output;
- `head`: the same beside the classifier Linear(s).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from fedsens.personalize import families, plugins
from fedsens.personalize.errors import UserError
from fedsens.personalize.mechanisms.registry import Mechanism, Placed, linear_modules, refuse, register

INITS = ("zero", "fedperfix")


class ParallelAdapter(nn.Module):
    """down (in -> mid), GELU, up (mid -> out) on a module's input, times `scale`, added to its output."""

    fedsens_part = "plugin"

    def __init__(self, dim_in: int, dim_out: int, mid: int, scale: float, init: str, generator: torch.Generator):
        super().__init__()
        self.down = nn.Linear(dim_in, mid)
        self.up = nn.Linear(mid, dim_out)
        for linear in (self.down, self.up):
            plugins.default_linear_init(linear, generator)
        if init == "zero":
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        self.scale = scale

    def hook(self, _module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """A bound method, so a deep copy of the model re-binds the hook to the copied adapter."""
        return output + self.up(F.gelu(self.down(args[0]))) * self.scale


@dataclass(frozen=True)
class AdapterOptions:
    mid: int = field(default=256, metadata={"help": "bottleneck width (FedPerfix's mid_dim)"})
    scale: float = field(default=1.5, metadata={"help": "scale of the adapter's output (FedPerfix's)"})
    init: str = field(default="zero", metadata={"help": "zero (starts as the plain model) or fedperfix (random)"})

    def __post_init__(self):
        if self.mid < 1:
            raise UserError(f"mechanism adapter option mid must be at least 1 (got {self.mid})")
        if self.init not in INITS:
            raise UserError(f"mechanism adapter option init must be zero or fedperfix (got {self.init!r})")


def _attention(model: nn.Module, selected: pd.DataFrame, options: AdapterOptions, seed: int) -> list[str]:
    blocks = sorted({int(b) for b in selected["block"] if int(b) >= 0})
    if not blocks:
        raise refuse("adapter", selected, "its attention belongs to no block")
    added = plugins.install(
        model, "fedperfix", mid_dim=options.mid, scale=options.scale, blocks=",".join(map(str, blocks)), seed=seed
    )
    if options.init == "zero":
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in added:
                if ".prefix.up." in name:
                    params[name].zero_()
    return added


def _beside(model: nn.Module, hosts: Sequence[tuple[str, nn.Module]], options: AdapterOptions, generator) -> list[str]:
    added = []
    for path, host in hosts:
        linears = [m for m in host.modules() if isinstance(m, nn.Linear)]
        adapter = ParallelAdapter(
            linears[0].in_features, linears[-1].out_features, options.mid, options.scale, options.init, generator
        ).to(linears[0].weight.device)
        host.add_module("adapter", adapter)
        host.register_forward_hook(adapter.hook)
        added += [f"{path}.adapter.{name}" for name, _ in adapter.named_parameters()]
    return added


def _mlps(model: nn.Module, selected: pd.DataFrame) -> list[tuple[str, nn.Module]]:
    modules = dict(model.named_modules())
    paths = [path for path, _ in families.of(model).blocks(model)]
    wanted = sorted({int(b) for b in selected["block"] if int(b) >= 0})
    return [(f"{paths[b]}.mlp", modules[f"{paths[b]}.mlp"]) for b in wanted if f"{paths[b]}.mlp" in modules]


@register
class Adapter(Mechanism):
    Options = AdapterOptions
    name = "adapter"
    summary = "a zero-initialised bottleneck adapter beside the part, local (attn: FedPerfix's key/value adapter)"

    def install(self, model: nn.Module, selected: pd.DataFrame, generator: torch.Generator) -> Placed:
        kinds = set(selected["part"].astype(str))
        if kinds == {"attn"}:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            added = _attention(model, selected, self.options, seed)
        elif kinds == {"mlp"}:
            added = _beside(model, _mlps(model, selected), self.options, generator)
        elif kinds == {"head"}:
            added = _beside(model, linear_modules(model, selected), self.options, generator)
        else:
            raise refuse(self.name, selected, "an adapter goes beside attn, mlp or head terms, one part type each")
        if not added:
            raise refuse(self.name, selected, "no module of it takes an adapter")
        return Placed(local=tuple(added), added=tuple(added))
