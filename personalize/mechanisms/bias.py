"""`bias`: only the part's bias vectors stay local (BitFit-style); every weight is federated."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from fedsens.personalize.mechanisms.registry import Mechanism, Placed, refuse, register


def is_bias(name: str) -> bool:
    """A bias vector: `.bias`, and the attention's separate `q_bias` / `v_bias` (Swin V2, BEiT, EVA)."""
    return name.rpartition(".")[2].endswith("bias")


@register
class Bias(Mechanism):
    name = "bias"
    summary = "only the part's bias vectors local (BitFit)"

    def install(self, model: nn.Module, selected: pd.DataFrame, generator: torch.Generator) -> Placed:
        local = tuple(p for p in selected["param"] if is_bias(str(p)))
        if not local:
            raise refuse(self.name, selected, "it has no bias vector")
        return Placed(local=local)
