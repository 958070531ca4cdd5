"""Aggregation of name-keyed tensors: the sample-weighted mean (FedAvg), one state at a time.

`RunningMean` adds each client's state with its final share in float64 as it arrives, so memory does not
grow with the number of participants; `weighted_mean` is the same sum over a list of states (the same
bits). Non-float tensors take the first client's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


class RunningMean:
    """The sample-weighted mean of the states `add`ed in order; the weights are known up front (each
    participant's train size), so each state is added with its final share."""

    def __init__(self, weights: Sequence[float]):
        total = float(sum(weights))
        if total <= 0:
            raise ValueError("aggregation weights must sum to a positive number")
        self.shares = [float(w) / total for w in weights]
        self.sums: dict[str, torch.Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.scratch: dict[str, torch.Tensor] = {}
        self.added = 0

    @torch.no_grad()
    def add(self, state: Mapping[str, torch.Tensor]) -> None:
        share = self.shares[self.added]
        if not self.added:
            for name, value in state.items():
                self.dtypes[name] = value.dtype
                if torch.is_floating_point(value):
                    self.sums[name] = torch.zeros_like(value, dtype=torch.float64)
                    self.scratch[name] = torch.empty_like(value, dtype=torch.float64)
                else:  # non-float tensors take the first client's
                    self.sums[name] = value.detach().clone()
        names = list(self.scratch)
        if not names:  # nothing shared (every part local): nothing to add
            self.added += 1
            return
        # value.to(float64) * share, then added, into buffers kept for the round and over all tensors at
        # once (one call per step instead of one per tensor)
        scratch = [self.scratch[name] for name in names]
        torch._foreach_copy_(scratch, [state[name].detach() for name in names])
        torch._foreach_mul_(scratch, share)
        torch._foreach_add_([self.sums[name] for name in names], scratch)
        self.added += 1

    def result(self) -> dict[str, torch.Tensor]:
        if not self.added:
            raise ValueError("nothing to aggregate")
        return {name: total.to(self.dtypes[name]) for name, total in self.sums.items()}


def weighted_mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Sample-weighted average of name-keyed tensors (FedAvg); non-float tensors take the first client's."""
    if not states:
        raise ValueError("nothing to aggregate")
    mean = RunningMean(weights)
    for state in states:
        mean.add(state)
    return mean.result()
