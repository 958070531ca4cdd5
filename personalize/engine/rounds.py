"""One round: sample the clients (seeded), train each, aggregate the shared tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedsens.personalize.aggregation import RunningMean
from fedsens.personalize.client import ClientContext, EvalResult, NonFiniteLoss, RunContext
from fedsens.personalize.config import RunConfig
from fedsens.personalize.engine import together
from fedsens.personalize.engine.state import RunState
from fedsens.personalize.engine.tensors import assign, nbytes
from fedsens.personalize.hooks import Hook
from fedsens.personalize.inputs import seeded_generator
from fedsens.personalize.methods import Method

TRAIN_STREAM, EVAL_STREAM = 1, 2  # the random streams of a client's training and its evaluation


def sample_clients(config: RunConfig, round_: int) -> list[int]:
    """The round's participants, seeded by (seed, round): every engine samples the same."""
    k = max(1, int(round(config.join_ratio * config.clients)))
    rng = np.random.default_rng([config.seed, round_, 1])
    return sorted(int(c) for c in rng.choice(config.clients, size=k, replace=False))


def client_context(ctx: RunContext, c: int, round_: int, extra: dict[str, torch.Tensor], stream: int) -> ClientContext:
    """Client c's context for this round, its random stream seeded by (seed, round, client, stream)."""
    return ClientContext(ctx, c, round_, extra, seeded_generator(ctx.config.seed, round_, c, stream))


class Aggregation:
    """The server's aggregation of one round, fed one participant's shared tensors at a time in client order.

    A method that `aggregates_by_weighted_mean` is folded into a running mean (memory does not grow with
    the participants); any other method's `aggregate` gets every state at the end.
    """

    def __init__(self, method: Method, weights: Sequence[float]):
        self.method, self.weights = method, list(weights)
        self.running = RunningMean(self.weights) if method.aggregates_by_weighted_mean else None
        self.collected: list[dict[str, torch.Tensor]] = []

    def add(self, shared: Mapping[str, torch.Tensor]) -> None:
        """One participant's shared tensors (copied when kept: the caller may reuse them)."""
        if self.running is not None:
            self.running.add(shared)
        else:
            self.collected.append({n: t.detach().clone() for n, t in shared.items()})

    def result(self) -> dict[str, torch.Tensor]:
        return (
            self.running.result() if self.running is not None else self.method.aggregate(self.collected, self.weights)
        )


@dataclass(frozen=True)
class RoundTraining:
    """What a round's training leaves besides the state: its participants, the bytes each way and, when the
    round is evaluated, each participant's test result right after its local training (the paper protocol)."""

    participants: list[int]
    exchanged_bytes: int
    trained: dict[int, EvalResult] = field(default_factory=dict)


def train_round(
    ctx: RunContext, method: Method, state: RunState, round_: int, hooks: Sequence[Hook] = (), *, evaluate: bool = False
) -> RoundTraining:
    """Train the round's clients from `state.shared` and aggregate into it; raises NonFiniteLoss at the first
    participant (in client order) whose local training diverged. With `client_batch` K > 1 (and nothing
    that needs the one-at-a-time path: `together.sequential_reason`) K participants train together."""
    participants = sample_clients(ctx.config, round_)
    aggregation = Aggregation(method, [len(ctx.partition.train[c]) for c in participants])
    trained: dict[int, EvalResult] = {}
    size = ctx.config.client_batch
    if size > 1 and together.sequential_reason(ctx, method) is None:
        trainable = [n for n, p in ctx.model.named_parameters() if p.requires_grad]
        for group in together.groups(participants, size):
            contexts = [client_context(ctx, c, round_, state.extra.client(c), TRAIN_STREAM) for c in group]
            for client, result in zip(contexts, together.train_together(ctx, state, contexts, trainable, hooks)):
                if result.nonfinite_loss is not None:
                    raise NonFiniteLoss(client.client, round_, result.nonfinite_loss)
                assign(ctx.named, state.shared)
                assign(ctx.named, result.tensors)  # the model as this client's training left it
                for hook in hooks:
                    hook.on_client_end(round_, client.client, ctx.model)
                _finish_client(ctx, method, state, client, aggregation, trained if evaluate else None)
    else:
        for c in participants:
            assign(ctx.named, state.shared)
            assign(ctx.named, state.local.client(c))
            client = client_context(ctx, c, round_, state.extra.client(c), TRAIN_STREAM)
            for hook in hooks:
                hook.on_client_start(round_, c, ctx.model)
            method.train_client(client)
            if client.nonfinite:
                raise NonFiniteLoss(c, round_, client.nonfinite_loss)
            for hook in hooks:
                hook.on_client_end(round_, c, ctx.model)
            _finish_client(ctx, method, state, client, aggregation, trained if evaluate else None)
    if ctx.shared_names:
        state.shared = aggregation.result()
    return RoundTraining(participants, nbytes(state.shared) * len(participants), trained)


def _finish_client(
    ctx: RunContext,
    method: Method,
    state: RunState,
    client: ClientContext,
    aggregation: Aggregation,
    trained: dict[int, EvalResult] | None,
) -> None:
    """A participant whose training left its tensors in the model: its local tensors and extra state kept,
    its shared ones aggregated, and (`trained` given: the paper protocol) its test result before aggregation."""
    c = client.client
    state.local.put(c, {n: ctx.named[n] for n in ctx.local_names})
    state.extra.put(c, client.state)
    aggregation.add({n: ctx.named[n] for n in ctx.shared_names})
    if trained is not None:
        probe = client_context(ctx, c, client.round, state.extra.client(c), EVAL_STREAM)
        trained[c] = method.evaluate_client(probe)
