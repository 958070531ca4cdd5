"""Each personalized-FL method as a small object whose hooks the one round loop calls.

A method says which parameters stay on the clients (`local_spec`), may change the model once
(`prepare_model`, e.g. to install plugins), keeps per-client extra state (`init_client`), and
decides how a client trains (`train_client`), how it is evaluated (`evaluate_client`) and how the
server aggregates the shared parameters (`aggregate`). `federation.run` owns the only loop.

The methods (`METHODS`), with the paper's settings as defaults (options are RunConfig fields):
fedavg (nothing local, or `personalize`), local (everything local, nothing sent), fedbn (norm),
fedper (head), fedrep (head; head epochs then body epochs), fedbabu (head frozen at its init,
fine-tuned before evaluation), apfl (personal model mixed with the global one by a learned alpha),
perfedavg (first-order Per-FedAvg), vanilla-attention (attn + head), vanilla-prefix and fedperfix
(attention plugins from `personalize.plugins`; plugin + head local). Where the paper and the
public FedPerfix code differ, the classes follow the code and their docstrings say so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fedsens.personalize import plugins
from fedsens.personalize.client import ClientContext, EvalResult
from fedsens.personalize.config import RunConfig
from fedsens.personalize.errors import UserError

if TYPE_CHECKING:
    import pandas as pd


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

    def __init__(self, config: RunConfig):
        self.config = config

    def prepare_model(self, model: nn.Module) -> None:
        """Change the freshly built model once (install plugins, freeze parts); default: nothing."""

    def local_spec(self) -> str:
        return self.config.personalize

    def init_client(self, client: int, model: nn.Module) -> dict[str, torch.Tensor]:
        """Extra per-client state beyond its local parameters (kept in the checkpoint); default none."""
        return {}

    def personal_params(self, parts: pd.DataFrame) -> int:
        """Parameters each client keeps beyond its local parts (extra state such as APFL's personal
        model), given the run's parts table; reported beside `local_params`. Default none."""
        return 0

    def train_client(self, ctx: ClientContext) -> None:
        """Plain local SGD over the client's train split for the configured epochs/steps."""
        optimizer = ctx.optimizer(p for p in ctx.model.parameters() if p.requires_grad)
        ctx.model.train()
        for x, y in ctx.train_batches():
            ctx.step(optimizer, x, y)

    def evaluate_client(self, ctx: ClientContext) -> EvalResult:
        return ctx.evaluate()

    def aggregate(
        self, states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
    ) -> dict[str, torch.Tensor]:
        return weighted_mean(states, weights)


def _part_names(ctx: ClientContext, part: str) -> set[str]:
    """Parameter names of one part type (from the run's resolved manifest)."""
    table = ctx.run.parts
    return set(table.loc[table["part"] == part, "param"])


@contextlib.contextmanager
def _only_trainable(model: nn.Module, names: set[str]) -> Iterator[list[nn.Parameter]]:
    """Freeze every parameter outside `names` for the duration (their backward pass is skipped too)."""
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(before[name] and name in names)
    try:
        yield [p for p in model.parameters() if p.requires_grad]
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(before[name])


def _train_steps(ctx: ClientContext, params: list[nn.Parameter], **batch_options) -> None:
    optimizer = ctx.optimizer(params)
    ctx.model.train()
    for x, y in ctx.train_batches(**batch_options):
        ctx.step(optimizer, x, y)


def _evaluate_adapted(ctx: ClientContext, adapt: Callable[[ClientContext], None]) -> EvalResult:
    """Adapt the client's model, evaluate it, and put the weights back (hooks may read them next)."""
    saved = {name: t.detach().clone() for name, t in ctx.model.state_dict().items()}
    adapt(ctx)
    result = ctx.evaluate()
    ctx.model.load_state_dict(saved)
    return result


class FixedParts(Method):
    """FedAvg training with a fixed set of local parts: the partial-personalization baselines."""

    parts = "none"

    def local_spec(self) -> str:
        return self.parts


class Local(FixedParts):
    """Every client trains alone: every parameter is local, nothing is exchanged (0 bytes)."""

    name, parts = "local", "all"


class FedBN(FixedParts):
    """FedBN: the normalisation layers stay local (on a ViT: every LayerNorm)."""

    name, parts = "fedbn", "norm"


class FedPer(FixedParts):
    """FedPer: the classification head stays local, everything else is averaged."""

    name, parts = "fedper", "head"


class VanillaAttention(FixedParts):
    """The paper's "vanilla attention" baseline: every self-attention layer and the head stay local."""

    name, parts = "vanilla-attention", "attn,head"


class FedRep(FixedParts):
    """FedRep (Collins et al. 2021): head local; each local round first trains the head for
    `fedrep_head_epochs` epochs with the body frozen, then the body for the configured local
    epochs/steps with the head frozen.

    The public FedPerfix code runs its "FedRep" preset as plain FedAvg with the head local, which
    is `fedper` here; this class is the alternating schedule of the FedRep paper (head epochs
    default 1, PFLlib's `plocal_steps` default).
    """

    name, parts = "fedrep", "head"

    def train_client(self, ctx: ClientContext) -> None:
        head = _part_names(ctx, "head")
        body = {name for name, _ in ctx.model.named_parameters()} - head
        self.train_phase(ctx, head, epochs=self.config.fedrep_head_epochs)
        self.train_phase(ctx, body)

    @staticmethod
    def train_phase(ctx: ClientContext, names: set[str], **batch_options) -> None:
        with _only_trainable(ctx.model, names) as params:
            _train_steps(ctx, params, **batch_options)


class FedBABU(FixedParts):
    """FedBABU (Oh et al. 2022): the head keeps its random initialisation during federated training
    (only the body learns and is averaged); before every evaluation the whole model (head
    included, as in the public code) is fine-tuned for `finetune_steps` batches of the client's
    train split, evaluated, and restored. The public code's default is 1 step.

    As in the public code the head is also kept local (`local_parts=['head']`), which changes
    nothing while it is frozen but saves sending it.
    """

    name, parts = "fedbabu", "head"

    def train_client(self, ctx: ClientContext) -> None:
        body = {name for name, _ in ctx.model.named_parameters()} - _part_names(ctx, "head")
        with _only_trainable(ctx.model, body) as params:
            _train_steps(ctx, params)

    def evaluate_client(self, ctx: ClientContext) -> EvalResult:
        return _evaluate_adapted(ctx, self.fine_tune)

    def fine_tune(self, ctx: ClientContext) -> None:
        _train_steps(ctx, list(ctx.model.parameters()), steps=self.config.finetune_steps)


class APFL(Method):
    """APFL (Deng et al. 2020) as the public code runs it.

    The global model w is fully shared (trained by plain local SGD and averaged). Each client also
    keeps a personal model v (all parameters) and a mixing weight alpha (initial `apfl_alpha`,
    0.25). Per batch: one SGD step on w; one SGD step on v with v's *own* loss; then
    alpha <- clip(alpha - lr * (<v - w, alpha*grad_v + (1-alpha)*grad_w> + 0.02*alpha), 0, 1).
    After the local epochs v <- (1 - alpha) * w + alpha * v, and that mixture is what is evaluated.
    The paper instead trains v on the loss of the mixture; we follow the public code.
    """

    name = "apfl"
    PERSONAL = "personal."

    def local_spec(self) -> str:
        return "none"

    def init_client(self, client: int, model: nn.Module) -> dict[str, torch.Tensor]:
        personal = {self.PERSONAL + name: p.detach().clone() for name, p in model.named_parameters()}
        return {"alpha": torch.tensor(float(self.config.apfl_alpha)), **personal}

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

        return _evaluate_adapted(ctx, load_personal)


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


class PerFedAvg(Method):
    """First-order Per-FedAvg (Fallah et al. 2020), everything shared.

    Each meta-step takes two consecutive batches: an inner SGD step (lr) on the first, the gradient
    on the second at the adapted weights, and an outer step (lr `perfedavg_beta`) from the weights
    before the inner step. Plain SGD, no momentum (whatever `optimizer` says), as the public code's
    PerAvgOptimizer. Before each evaluation the client adapts with one SGD step on one train batch,
    then is restored. The public code ignores its beta option and uses beta = lr (preset: both
    0.001); `perfedavg_beta=None` (the default) does the same.
    """

    name = "perfedavg"

    def local_spec(self) -> str:
        return "none"

    def train_client(self, ctx: ClientContext) -> None:
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        beta = self.config.perfedavg_beta if self.config.perfedavg_beta is not None else self.config.lr
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
        return _evaluate_adapted(ctx, self.adapt)

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


class FedPerfix(Method):
    """FedPerfix (Sun et al. ICCV 2023): a local adapter per attention layer generates key/value
    offsets ("prefixes"); the adapters and the head stay local, the rest (attention included) is
    averaged. `fedperfix_local` adds part-spec terms, e.g. "blocks.11" as the public CIFAR-100
    preset does. Plugin options: plugin_mid_dim (256), plugin_scale (1.5; the public argparse
    default 0.8 is overridden by its preset), plugin_depth (all blocks).
    """

    name = "fedperfix"
    plugin = "fedperfix"

    def prepare_model(self, model: nn.Module) -> None:
        cfg = self.config
        plugins.install(
            model,
            self.plugin,
            mid_dim=cfg.plugin_mid_dim,
            scale=cfg.plugin_scale,
            depth=cfg.plugin_depth,
            init=cfg.plugin_init,
            seed=cfg.seed + 1,
        )

    def local_spec(self) -> str:
        return ",".join(term for term in ("plugin", "head", self.config.fedperfix_local) if term)


class VanillaPrefix(FedPerfix):
    """The code's "vanilla prefix" variant: offsets from one Linear(dim, 2*dim) (`plugin_init`
    zero or random) in place of the adapter; plugin and head local."""

    name = "vanilla-prefix"
    plugin = "vanilla-prefix"

    def local_spec(self) -> str:
        return "plugin,head"


METHODS: dict[str, type[Method]] = {
    method.name: method
    for method in (
        Method,
        Local,
        FedBN,
        FedPer,
        FedRep,
        FedBABU,
        APFL,
        PerFedAvg,
        VanillaAttention,
        VanillaPrefix,
        FedPerfix,
    )
}


def get_method(config: RunConfig) -> Method:
    """The method object for a run; unknown names are a user error."""
    if config.method not in METHODS:
        raise UserError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)}")
    if config.method != "fedavg" and config.personalize != "none":
        raise UserError(
            f"--method {config.method} fixes which parts are local; drop --personalize "
            f"{config.personalize!r} or use --method fedavg with it"
        )
    return METHODS[config.method](config)
