"""`full`: the part's own parameters stay on the client (the only mechanism before there were several)."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from fedsens.personalize.mechanisms.registry import Mechanism, Placed, register


@register
class Full(Mechanism):
    name = "full"
    summary = "the part's own parameters local"

    def install(self, model: nn.Module, selected: pd.DataFrame, generator: torch.Generator) -> Placed:
        return Placed(local=tuple(selected["param"]))
