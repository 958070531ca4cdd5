"""`finetune`: nothing local while federating; each client fine-tunes the part for `steps` steps on its own
train split before it is evaluated (what `fedsens probe` measures after a FedAvg run, here at every
evaluation and as a sweep cell with the sweep's paired statistics). The fine-tuned weights are put back
after the evaluation: nothing a client adapts is kept or sent."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from fedsens.personalize.errors import UserError
from fedsens.personalize.mechanisms.registry import Mechanism, Placed, register


@register
class FineTune(Mechanism):
    @dataclass(frozen=True)
    class Options:
        steps: int = field(default=20, metadata={"help": "local steps before each evaluation"})

        def __post_init__(self):
            if self.steps < 1:
                raise UserError(f"mechanism finetune option steps must be at least 1 (got {self.steps})")

    name = "finetune"
    summary = "nothing local; each client fine-tunes the part for k steps before it is evaluated"

    def install(self, model: nn.Module, selected: pd.DataFrame, generator: torch.Generator) -> Placed:
        return Placed(adapt=tuple(selected["param"]), adapt_steps=self.options.steps)
