"""Per-FedAvg: first-order MAML-style local steps, one adaptation step before evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedsens.personalize.methods.base import Method, evaluate_adapted
from fedsens.personalize.methods.registry import register_method

if TYPE_CHECKING:
    from fedsens.personalize.client import ClientContext, EvalResult


@register_method
class PerFedAvg(Method):
    """First-order Per-FedAvg (Fallah et al. 2020), everything shared.

    Each meta-step takes two consecutive batches: an inner SGD step (lr) on the first, the gradient
    on the second at the adapted weights, and an outer step (lr `beta`) from the weights before the
    inner step. Plain SGD, no momentum (whatever `optimizer` says), as the public code's
    PerAvgOptimizer. Before each evaluation the client adapts with one SGD step on one train batch,
    then is restored. The public code ignores its beta option and uses beta = lr (preset: both
    0.001); `beta=None` (the default) does the same.
    """

    @dataclass(frozen=True)
    class Options:
        beta: float | None = field(default=None, metadata={"help": "outer step size; none = the run's lr"})

    name, paper_row, parts = "perfedavg", 8, "none"
    paper_label = "Per-FedAvg"
    summary = "first-order Per-FedAvg (meta-learned initialisation, one adaptation step)"
    paper = (
        "Fallah et al., Personalized Federated Learning with Theoretical Guarantees: "
        "A Model-Agnostic Meta-Learning Approach, NeurIPS 2020"
    )

    def train_client(self, ctx: ClientContext) -> None:
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        beta = self.options.beta if self.options.beta is not None else self.config.lr
        ctx.model.train()
        stream = ctx.train_batches()
        for (x_inner, y_inner), (x_outer, y_outer) in zip(stream, stream):  # consecutive pairs
            start = [p.detach().clone() for p in params]
            _sgd_step(ctx, params, x_inner, y_inner, self.config.lr)
            grads = _gradients(ctx, params, x_outer, y_outer)
            with torch.no_grad():
                for p, p0, g in zip(params, start, grads):
                    p.copy_(p0 - beta * g)

    def evaluate_client(self, ctx: ClientContext) -> EvalResult:
        return evaluate_adapted(ctx, self.adapt)

    def adapt(self, ctx: ClientContext) -> None:
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        ctx.model.train()
        for x, y in ctx.train_batches(steps=1):
            _sgd_step(ctx, params, x, y, self.config.lr)


def _gradients(ctx: ClientContext, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    loss = ctx.loss(x, y)
    ctx.nonfinite = ctx.nonfinite or not bool(torch.isfinite(loss.detach()))
    return list(torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True))


def _sgd_step(ctx: ClientContext, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
    grads = _gradients(ctx, params, x, y)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(lr * g)
