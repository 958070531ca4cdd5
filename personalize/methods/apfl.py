"""APFL: a personal model mixed with the global one by a learned weight."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fedsens.personalize.errors import UserError
from fedsens.personalize.methods.base import Method, evaluate_adapted
from fedsens.personalize.methods.registry import register_method

if TYPE_CHECKING:
    import pandas as pd

    from fedsens.personalize.client import ClientContext, EvalResult


@register_method
class APFL(Method):
    """APFL (Deng et al. 2020) as the public code runs it.

    The global model w is fully shared (trained by plain local SGD and averaged). Each client also
    keeps a personal model v (all parameters) and a mixing weight alpha (initial `alpha`, 0.25).
    Per batch: one SGD step on w; one SGD step on v with v's *own* loss; then
    alpha <- clip(alpha - lr * (<v - w, alpha*grad_v + (1-alpha)*grad_w> + 0.02*alpha), 0, 1).
    After the local epochs v <- (1 - alpha) * w + alpha * v, and that mixture is what is evaluated.
    The paper instead trains v on the loss of the mixture; we follow the public code.
    """

    @dataclass(frozen=True)
    class Options:
        alpha: float = field(default=0.25, metadata={"help": "initial mixing weight of the personal model"})

        def __post_init__(self):
            if not 0 <= self.alpha <= 1:
                raise UserError(f"apfl option alpha must be in [0, 1] (got {self.alpha})")

    name, paper_row, parts = "apfl", 7, "none"
    paper_label = "APFL"
    summary = "a personal model mixed with the global one by a learned alpha"
    paper = "Deng et al., Adaptive Personalized Federated Learning, arXiv:2003.13461, 2020"
    PERSONAL = "personal."

    def init_client(self, client: int, model: nn.Module) -> dict[str, torch.Tensor]:
        personal = {self.PERSONAL + name: p.detach().clone() for name, p in model.named_parameters()}
        return {"alpha": torch.tensor(float(self.options.alpha)), **personal}

    def personal_params(self, parts: pd.DataFrame) -> int:
        return int(parts["numel"].sum())  # a whole personal model per client

    def personal(self, ctx: ClientContext) -> dict[str, torch.Tensor]:
        return {name[len(self.PERSONAL) :]: t for name, t in ctx.state.items() if name.startswith(self.PERSONAL)}

    def train_client(self, ctx: ClientContext) -> None:
        model, lr = ctx.model, self.config.lr
        model.train()
        shared = dict(model.named_parameters())
        personal = {name: t.detach().clone().requires_grad_() for name, t in self.personal(ctx).items()}
        optimizer_w = ctx.optimizer(shared.values())
        optimizer_v = ctx.optimizer(personal.values())
        alpha = float(ctx.state["alpha"])
        for x, y in ctx.train_batches():
            ctx.step(optimizer_w, x, y)
            with ctx.run.autocast():
                logits = torch.func.functional_call(model, personal, (x,))
            loss = F.cross_entropy(logits.float(), y)
            optimizer_v.zero_grad(set_to_none=True)
            loss.backward()
            optimizer_v.step()
            ctx.nonfinite = ctx.nonfinite or not bool(torch.isfinite(loss.detach()))
            alpha = alpha_step(alpha, lr, shared, personal)
        with torch.no_grad():
            for name, v in personal.items():
                ctx.state[self.PERSONAL + name] = (1 - alpha) * shared[name].detach() + alpha * v.detach()
        ctx.state["alpha"] = torch.tensor(alpha)

    def evaluate_client(self, ctx: ClientContext) -> EvalResult:
        def load_personal(ctx: ClientContext) -> None:
            with torch.no_grad():
                for name, p in ctx.model.named_parameters():
                    p.copy_(self.personal(ctx)[name])

        return evaluate_adapted(ctx, load_personal)


def alpha_step(
    alpha: float,
    lr: float,
    shared: Mapping[str, torch.Tensor],
    personal: Mapping[str, torch.Tensor],
    decay: float = 0.02,
) -> float:
    """One APFL mixing-weight step from the current gradients of w and v, clamped to [0, 1]."""
    terms = [
        ((personal[name].detach() - w.detach()) * (alpha * grad_v + (1 - alpha) * grad_w)).sum()
        for name, w in shared.items()
        if (grad_w := w.grad) is not None and (grad_v := personal[name].grad) is not None
    ]
    grad = decay * alpha + (float(torch.stack(terms).sum()) if terms else 0.0)  # one device sync per step
    return min(1.0, max(0.0, alpha - lr * grad))
