"""`lora` and `lora-b`: a rank-r low-rank delta on each nn.Linear of the part (Hu et al., ICLR 2022).

Each selected Linear gets a child module `<linear>.lora` holding `a` (r x in) and `b` (out x r) and a forward
hook adding `(alpha / r) * x A^T B^T` to the Linear's output: the Linear's own weight keeps its name and stays
federated. `b` starts at zero, so the model starts as the plain one; `a` takes PyTorch's Linear init (seeded),
as peft does. `lora`: A and B local, r x (in + out) local parameters per Linear; `lora-b`: A federated and B
local, as FedSA-LoRA (Guo et al., arXiv 2410.01463) shares A and keeps B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from fedsens.personalize.errors import UserError
from fedsens.personalize.mechanisms.registry import Mechanism, Placed, linear_modules, refuse, register


class LowRankDelta(nn.Module):
    """The delta B A of one Linear, added to its output by a forward hook."""

    fedsens_part = "plugin"

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        weight = linear.weight
        self.a = nn.Parameter(torch.empty(rank, linear.in_features, dtype=weight.dtype))
        self.b = nn.Parameter(torch.zeros(linear.out_features, rank, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5), generator=generator)
        self.scale = alpha / rank

    def hook(self, _linear: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """A bound method, so a deep copy of the model re-binds the hook to the copied delta."""
        return output + F.linear(F.linear(args[0], self.a), self.b) * self.scale


@dataclass(frozen=True)
class LoraOptions:
    r: int = field(default=4, metadata={"help": "rank of the delta"})
    alpha: float = field(default=8.0, metadata={"help": "the delta is scaled by alpha / r"})

    def __post_init__(self):
        if self.r < 1:
            raise UserError(f"mechanism lora option r must be at least 1 (got {self.r})")


def install_deltas(
    model: nn.Module, selected: pd.DataFrame, options: LoraOptions, generator: torch.Generator, mechanism: str
) -> list[str]:
    """A LowRankDelta on each selected Linear; the names of the added parameters (a, b per Linear)."""
    linears = linear_modules(model, selected)
    if not linears:
        raise refuse(mechanism, selected, "it has no linear layer (LoRA adapts nn.Linear weights)")
    added = []
    for path, linear in linears:
        if hasattr(linear, "lora"):
            raise UserError(f"{path} would get two LoRA deltas; name each linear layer in one lora term")
        delta = LowRankDelta(linear, options.r, options.alpha, generator).to(linear.weight.device)
        linear.add_module("lora", delta)
        linear.register_forward_hook(delta.hook)
        added += [f"{path}.lora.a", f"{path}.lora.b"]
    return added


@register
class Lora(Mechanism):
    Options = LoraOptions
    name = "lora"
    summary = "a rank-r delta B A on each linear of the part; base weight federated, A and B local"

    def install(self, model: nn.Module, selected: pd.DataFrame, generator: torch.Generator) -> Placed:
        added = install_deltas(model, selected, self.options, generator, self.name)
        return Placed(local=tuple(added), added=tuple(added))


@register
class LoraB(Mechanism):
    Options = LoraOptions
    name = "lora-b"
    summary = "LoRA with A federated and B local (FedSA-LoRA)"

    def install(self, model: nn.Module, selected: pd.DataFrame, generator: torch.Generator) -> Placed:
        added = install_deltas(model, selected, self.options, generator, self.name)
        return Placed(local=tuple(n for n in added if n.endswith(".lora.b")), added=tuple(added))
