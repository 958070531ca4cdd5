"""Each personalized-FL method as a small object whose hooks the one round loop calls.

A method says which parameters stay on the clients (`local_spec`), may change the model once
(`prepare_model`, e.g. to install plugins), keeps per-client extra state (`init_client`), and
decides how a client trains (`train_client`), how it is evaluated (`evaluate_client`) and how the
server aggregates the shared parameters (`aggregate`). `federation.run` owns the only loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import nn

from personalize.errors import UserError

if TYPE_CHECKING:  # only for annotations: federation imports this module
    from personalize.federation import ClientContext, EvalResult, RunConfig


def weighted_mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Sample-weighted average of name-keyed tensors (FedAvg); non-float tensors take the first client's."""
    if not states:
        raise ValueError("nothing to aggregate")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights must sum to a positive number")
    out: dict[str, torch.Tensor] = {}
    for name, first in states[0].items():
        if not torch.is_floating_point(first):
            out[name] = first.clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for state, w in zip(states, weights):
            acc += state[name].to(torch.float64) * (float(w) / total)
        out[name] = acc.to(first.dtype)
    return out


class Method:
    """FedAvg with `config.personalize` kept local: the base every method builds on."""

    name = "fedavg"

    def __init__(self, config: "RunConfig"):
        self.config = config

    def prepare_model(self, model: nn.Module) -> None:
        """Change the freshly built model once (install plugins, freeze parts); default: nothing."""

    def local_spec(self) -> str:
        return self.config.personalize

    def init_client(self, client: int, model: nn.Module) -> dict[str, torch.Tensor]:
        """Extra per-client state beyond its local parameters (kept in the checkpoint); default none."""
        return {}

    def train_client(self, ctx: "ClientContext") -> None:
        """Plain local SGD over the client's train split for the configured epochs/steps."""
        optimizer = ctx.optimizer(p for p in ctx.model.parameters() if p.requires_grad)
        ctx.model.train()
        for x, y in ctx.train_batches():
            ctx.step(optimizer, x, y)

    def evaluate_client(self, ctx: "ClientContext") -> "EvalResult":
        return ctx.evaluate()

    def aggregate(self, states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
        return weighted_mean(states, weights)


METHODS: dict[str, type[Method]] = {"fedavg": Method}


def get_method(config: "RunConfig") -> Method:
    """The method object for a run; unknown names are a user error."""
    if config.method not in METHODS:
        raise UserError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)}")
    if config.method != "fedavg" and config.personalize != "none":
        raise UserError(f"--method {config.method} fixes which parts are local; drop --personalize "
                        f"{config.personalize!r} or use --method fedavg with it")
    return METHODS[config.method](config)
