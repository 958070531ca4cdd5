"""The base every method builds on (FedAvg behaviour), its options, and the helpers methods share.

A method says which parameters stay on the clients (`local_spec`), may change the model once
(`prepare_model`, e.g. to install plugins), keeps per-client extra state (`init_client`), and
decides how a client trains (`train_client`), how it is evaluated (`evaluate_client`) and how the
server aggregates the shared parameters (`aggregate`). `federation.run` owns the only loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from fedsens.personalize import mechanisms
from fedsens.personalize.aggregation import weighted_mean
from fedsens.personalize.methods.registry import resolve_options

if TYPE_CHECKING:
    import pandas as pd

    from fedsens.personalize.client import ClientContext, EvalResult
    from fedsens.personalize.config import RunConfig


@dataclass(frozen=True)
class NoOptions:
    """The options of a method that takes none."""


def train_mode(model: nn.Module) -> None:
    """`model.train()`, skipped when the model is in training mode already: fedsens only ever switches the
    whole model, so the root's flag tells, and walking the module tree for every client cost ~1 ms each."""
    if not model.training:
        model.train()


class Method:
    """FedAvg with `config.personalize` kept local: the base every method builds on.

    Class attributes a method sets: `name` (registry key), `summary` (one line), `paper` (where it
    comes from), `paper_row` (its row in the paper's main table, or None), `paper_label` (that row's
    name), `parts` (the part spec it keeps local; None = whatever `--personalize` says) and `Options`
    (a frozen dataclass).

    Three capabilities say what an engine may do in place of the hooks, for speed:
    `aggregates_by_weighted_mean` (the engine folds each participant's shared tensors into a running
    weighted mean as it arrives instead of calling `aggregate` on them all), `evaluates_plainly` (the
    engine evaluates many clients in one batched forward instead of calling `evaluate_client` on each)
    and `trains_plainly` (the engine may train several participants together, `engine.together`, instead
    of calling `train_client` on each). All hold for the base hooks; a subclass that overrides `aggregate`,
    `evaluate_client` or `train_client` without declaring the capability in its own body loses it, so an
    engine never skips a hook it should call.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    paper_row: ClassVar[int | None] = None
    paper_label: ClassVar[str] = ""  # how compare's paper_rows names the paper's row this method reproduces
    parts: ClassVar[str | None] = None
    Options: ClassVar[type] = NoOptions
    aggregates_by_weighted_mean: ClassVar[bool] = True
    evaluates_plainly: ClassVar[bool] = True
    trains_plainly: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for capability, hook in (
            ("aggregates_by_weighted_mean", "aggregate"),
            ("evaluates_plainly", "evaluate_client"),
            ("trains_plainly", "train_client"),
        ):
            if hook in vars(cls) and capability not in vars(cls):
                setattr(cls, capability, False)

    def __init__(self, config: RunConfig):
        self.config = config
        self.options: Any = resolve_options(type(self), config.method_options)
        self.placement = mechanisms.Placement()

    def prepare_model(self, model: nn.Module) -> None:
        """Change the freshly built model once (install plugins, freeze parts); default: nothing."""

    def local_spec(self) -> str:
        return self.config.personalize if self.parts is None else self.parts

    def place(self, model: nn.Module) -> mechanisms.Placement:
        """Install the local spec's mechanisms (after `prepare_model`) and remember what each client keeps.
        A mechanism that fine-tunes before evaluation makes the engine evaluate client by client."""
        self.placement = mechanisms.install(
            model, self.local_spec(), seed=self.config.seed + 2, backbone=self.config.backbone
        )
        if self.placement.adapt:
            self.evaluates_plainly = False  # type: ignore[misc]  # this run's method adapts per client
        return self.placement

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
        train_mode(ctx.model)
        for x, y in ctx.train_batches():
            ctx.step(optimizer, x, y)

    def evaluate_client(self, ctx: ClientContext) -> EvalResult:
        if self.placement.adapt:  # the `finetune` mechanism: adapt the part, evaluate, put the weights back
            return evaluate_adapted(ctx, self.fine_tune)
        return ctx.evaluate()

    def fine_tune(self, ctx: ClientContext) -> None:
        """The placement's fine-tuned parameters alone, for its steps, on the client's train split."""
        with only_trainable(ctx.model, set(self.placement.adapt)) as params:
            train_steps(ctx, params, steps=self.placement.adapt_steps)

    def aggregate(
        self, states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
    ) -> dict[str, torch.Tensor]:
        return weighted_mean(states, weights)


def part_names(ctx: ClientContext, part: str) -> set[str]:
    """Parameter names of one part type (from the run's resolved manifest)."""
    table = ctx.run.parts
    return set(table.loc[table["part"] == part, "param"])


@contextlib.contextmanager
def only_trainable(model: nn.Module, names: set[str]) -> Iterator[list[nn.Parameter]]:
    """Freeze every parameter outside `names` for the duration (their backward pass is skipped too)."""
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(before[name] and name in names)
    try:
        yield [p for p in model.parameters() if p.requires_grad]
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(before[name])


def train_steps(ctx: ClientContext, params: list[nn.Parameter], **batch_options) -> None:
    optimizer = ctx.optimizer(params)
    train_mode(ctx.model)
    for x, y in ctx.train_batches(**batch_options):
        ctx.step(optimizer, x, y)


def evaluate_adapted(ctx: ClientContext, adapt: Callable[[ClientContext], None]) -> EvalResult:
    """Adapt the client's model, evaluate it, and put the weights back (hooks may read them next)."""
    saved = {name: t.detach().clone() for name, t in ctx.model.state_dict().items()}
    adapt(ctx)
    result = ctx.evaluate()
    ctx.model.load_state_dict(saved)
    return result
