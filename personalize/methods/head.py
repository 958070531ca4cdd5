"""The head-local methods that change how a client trains: FedRep (alternating) and FedBABU (frozen head)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedsens.personalize.errors import UserError
from fedsens.personalize.methods.base import Method, evaluate_adapted, only_trainable, part_names, train_steps
from fedsens.personalize.methods.registry import register_method

if TYPE_CHECKING:
    from fedsens.personalize.client import ClientContext, EvalResult


@register_method
class FedRep(Method):
    """FedRep (Collins et al. 2021): head local; each local round first trains the head for
    `head_epochs` epochs with the body frozen, then the body for the configured local
    epochs/steps with the head frozen.

    The public FedPerfix code runs its "FedRep" preset as plain FedAvg with the head local, which
    is `fedper` here; this class is the alternating schedule of the FedRep paper (head epochs
    default 1, PFLlib's `plocal_steps` default).
    """

    @dataclass(frozen=True)
    class Options:
        head_epochs: int = field(default=1, metadata={"help": "epochs of head training (body frozen) per round"})

        def __post_init__(self):
            if self.head_epochs < 1:
                raise UserError(f"fedrep option head_epochs must be at least 1 (got {self.head_epochs})")

    name, paper_row, parts = "fedrep", 5, "head"
    paper_label = "- (FedRep paper's schedule; not in the paper's table)"
    summary = "head local; head epochs then body epochs each round"
    paper = "Collins et al., Exploiting Shared Representations for Personalized Federated Learning, ICML 2021"

    def train_client(self, ctx: ClientContext) -> None:
        head = part_names(ctx, "head")
        body = {name for name, _ in ctx.model.named_parameters()} - head
        self.train_phase(ctx, head, epochs=self.options.head_epochs)
        self.train_phase(ctx, body)

    @staticmethod
    def train_phase(ctx: ClientContext, names: set[str], **batch_options) -> None:
        with only_trainable(ctx.model, names) as params:
            train_steps(ctx, params, **batch_options)


@register_method
class FedBABU(Method):
    """FedBABU (Oh et al. 2022): the head keeps its random initialisation during federated training
    (only the body learns and is averaged); before every evaluation the whole model (head
    included, as in the public code) is fine-tuned for `finetune_steps` batches of the client's
    train split, evaluated, and restored. The public code's default is 1 step.

    As in the public code the head is also kept local (`local_parts=['head']`), which changes
    nothing while it is frozen but saves sending it.
    """

    @dataclass(frozen=True)
    class Options:
        finetune_steps: int = field(default=5, metadata={"help": "local fine-tuning batches before each evaluation"})

        def __post_init__(self):
            if self.finetune_steps < 0:
                raise UserError(f"fedbabu option finetune_steps must be >= 0 (got {self.finetune_steps})")

    name, paper_row, parts = "fedbabu", 6, "head"
    paper_label = "FedBABU"
    summary = "head frozen at its init; fine-tuned before evaluation"
    paper = "Oh et al., FedBABU: Towards Enhanced Representation for Federated Image Classification, ICLR 2022"

    def train_client(self, ctx: ClientContext) -> None:
        body = {name for name, _ in ctx.model.named_parameters()} - part_names(ctx, "head")
        with only_trainable(ctx.model, body) as params:
            train_steps(ctx, params)

    def evaluate_client(self, ctx: ClientContext) -> EvalResult:
        return evaluate_adapted(ctx, self.fine_tune)

    def fine_tune(self, ctx: ClientContext) -> None:
        train_steps(ctx, list(ctx.model.parameters()), steps=self.options.finetune_steps)
