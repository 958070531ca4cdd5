"""Clients trained together: a round's participants stacked along a leading client dimension, K at a time.

The participants of a round all start from the same shared tensors and train independently, so K of
them can run as one: each tensor they train (and each local one) is stacked into K x shape, one
`torch.func.vmap` over `functional_call` computes the K clients' losses on their own batches, one
backward gives each client's gradient in its own rows, and one optimizer step updates them all.

What keeps it equal to the one-at-a-time path (`rounds.train_round` with `client_batch` 1):

- each client draws exactly the batches it would alone: its own stream from its own seeded generator
  (order and augmentation), through the same `ClientContext.train_batches`;
- a short batch is padded to the step's widest and masked per sample: the loss is the mean over the
  client's real samples only;
- the optimizer is torch's own (built by `ClientContext.optimizer`, fused as the sequential path's): its
  update is elementwise, so a row of the stacked state is that client's state. Every client still
  training has taken as many steps as the others (they start together), so the shared step count is
  each one's own;
- a client whose stream ends leaves the stack at once (its rows, and its rows of the optimizer state,
  are dropped), so its tensors are the ones its last step left.

Hooks still see each client's model: before the group trains, each client's starting tensors are loaded
into the model for its `on_client_start` (and read back from it, so a hook that changes them is trained
from), and `rounds.train_round` loads each one's trained tensors for its `on_client_end`; a group's
`on_client_start` calls all come before its `on_client_end` calls.

Where this cannot hold, `sequential_reason` says why and the round trains one client at a time: a
method that trains its own way (it overrides `Method.train_client`, so `Method.trains_plainly` is
False: FedRep, FedBABU, APFL, Per-FedAvg), and models whose training forward draws random numbers or
mixes samples (dropout, batch norm).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from fedsens.personalize.client import ClientContext, RunContext
from fedsens.personalize.engine.state import RunState
from fedsens.personalize.engine.tensors import assign
from fedsens.personalize.hooks import Hook
from fedsens.personalize.methods import Method
from fedsens.personalize.methods.base import train_mode

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TrainedClient:
    """One participant after its local training: the tensors it trained (and its local ones) and the first
    non-finite loss it hit, None when every loss was finite."""

    client: int
    tensors: dict[str, torch.Tensor]
    nonfinite_loss: float | None


def sequential_reason(ctx: RunContext, method: Method) -> str | None:
    """Why this run's clients must train one at a time, or None when they can train together."""
    if not method.trains_plainly:
        return f"method {method.name} trains its clients its own way"
    for name, module in ctx.model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return f"the model's {name} normalises over the batch"
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"the model's {name} drops at random"
        if float(getattr(module, "drop_prob", 0.0) or 0.0) > 0:  # timm's DropPath
            return f"the model's {name} drops paths at random"
    return None


def groups(participants: Sequence[int], size: int) -> Iterator[list[int]]:
    """The participants in client order, `size` at a time."""
    for start in range(0, len(participants), size):
        yield list(participants[start : start + size])


def train_together(
    ctx: RunContext,
    state: RunState,
    clients: Sequence[ClientContext],
    trainable: Sequence[str],
    hooks: Sequence[Hook] = (),
) -> list[TrainedClient]:
    """Train `clients` (their contexts for this round) together from `state`; each one's result in order.

    `trainable`: the names of the parameters the optimizer steps (the model's parameters that require
    gradients); the run's local tensors are stacked as well, each client starting from its own. `hooks`:
    their `on_client_start` is called for each client, its starting tensors in the model.
    """
    names = list(dict.fromkeys([*trainable, *ctx.local_names]))
    if hooks:
        tensors = _started_by_hooks(ctx, state, clients, names, hooks)
    else:
        local = state.local.rows([client.client for client in clients])
        tensors = {name: _start(state, local, name, len(clients)).to(ctx.device) for name in names}
    assign(ctx.named, state.shared)  # what is not stacked (frozen shared tensors) comes from the model
    steps = _Stack(ctx, clients[0], tensors, set(trainable))
    streams = [client.train_batches() for client in clients]
    train_mode(ctx.model)
    alive = list(range(len(clients)))  # positions in `clients` of the rows of the stack
    final: dict[int, dict[str, torch.Tensor]] = {}
    nonfinite: dict[int, float] = {}
    while alive:
        drawn = [next(streams[k], None) for k in alive]
        if any(batch is None for batch in drawn):
            for row, k in enumerate(alive):
                if drawn[row] is None:
                    final[k] = steps.row(row)
            keep = [row for row, batch in enumerate(drawn) if batch is not None]
            steps.keep(keep)
            alive = [alive[row] for row in keep]
            drawn = [drawn[row] for row in keep]
        if not alive:
            break
        losses = steps.step([batch for batch in drawn if batch is not None])
        finite = torch.isfinite(losses)
        if not bool(finite.all()):  # one check a step, as the sequential path's
            for row in (~finite).nonzero().flatten().tolist():
                nonfinite.setdefault(alive[row], float(losses[row]))
    return [TrainedClient(client.client, final[k], nonfinite.get(k)) for k, client in enumerate(clients)]


def _start(state: RunState, local: Mapping[str, torch.Tensor], name: str, count: int) -> torch.Tensor:
    """The stacked starting value of one tensor: each client's own local rows, or the shared tensor K times."""
    if name in local:
        return local[name].detach().clone()
    shared = state.shared[name].detach()
    return shared.unsqueeze(0).expand(count, *shared.shape).clone()


def _started_by_hooks(
    ctx: RunContext, state: RunState, clients: Sequence[ClientContext], names: Sequence[str], hooks: Sequence[Hook]
) -> dict[str, torch.Tensor]:
    """Each client's starting tensors loaded into the model for the hooks' `on_client_start`, then stacked
    from the model as the hooks left them."""
    rows: list[dict[str, torch.Tensor]] = []
    for client in clients:
        assign(ctx.named, state.shared)
        assign(ctx.named, state.local.client(client.client))
        for hook in hooks:
            hook.on_client_start(client.round, client.client, ctx.model)
        rows.append({name: ctx.named[name].detach().clone() for name in names})
    return {name: torch.stack([row[name] for row in rows]) for name in names}


class _Stack:
    """The stacked tensors of the clients still training and their optimizer (torch's own, on the stacks)."""

    def __init__(self, ctx: RunContext, client: ClientContext, tensors: dict[str, torch.Tensor], trainable: set[str]):
        self.ctx, self.client, self.trainable = ctx, client, trainable
        self.tensors = {n: t.requires_grad_(n in trainable) for n, t in tensors.items()}
        self.optimizer = client.optimizer(self.tensors[n] for n in self.tensors if n in trainable)

    def row(self, row: int) -> dict[str, torch.Tensor]:
        return {name: t[row].detach().clone() for name, t in self.tensors.items()}

    def keep(self, rows: list[int]) -> None:
        """Only these rows go on training: the stacks and the optimizer's state cut down to them."""
        if not rows:
            return
        index = torch.tensor(rows, device=next(iter(self.tensors.values())).device)
        old, old_state = self.tensors, self.optimizer.state
        self.tensors = {n: t.detach()[index].requires_grad_(n in self.trainable) for n, t in old.items()}
        self.optimizer = self.client.optimizer(self.tensors[n] for n in self.tensors if n in self.trainable)
        for name in self.trainable:
            before = old[name]
            self.optimizer.state[self.tensors[name]] = {
                key: value[index] if torch.is_tensor(value) and value.shape == before.shape else value
                for key, value in old_state.get(before, {}).items()
            }

    def step(self, drawn: Sequence[Batch]) -> torch.Tensor:
        """One optimizer step of every row on its own batch; the rows' losses (detached)."""
        x, y, real = _padded(drawn)
        model, autocast = self.ctx.model, self.ctx.autocast

        def loss(own: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
            with autocast():
                logits = functional_call(model, own, (x,), strict=False)
            per_sample = F.cross_entropy(logits.float(), y, reduction="none")
            return torch.where(real, per_sample, 0.0).sum() / real.sum()

        with _plain_attention(model, self.ctx.device), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            losses = vmap(loss)(self.tensors, x, y, real)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        self.optimizer.step()
        return losses.detach()


def _padded(drawn: Sequence[Batch]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows' batches padded to the widest (zeros), and which samples are real."""
    width = max(len(y) for _, y in drawn)
    xs, ys, real = [], [], []
    for x, y in drawn:
        missing = width - len(y)
        xs.append(F.pad(x, (0, 0) * (x.dim() - 1) + (0, missing)) if missing else x)
        ys.append(F.pad(y, (0, missing)) if missing else y)
        real.append(torch.arange(width, device=y.device) < len(y))
    return torch.stack(xs), torch.stack(ys), torch.stack(real)


@contextlib.contextmanager
def _plain_attention(model: nn.Module, device: torch.device) -> Iterator[None]:
    """On the CPU, timm's attention written out (matmul, softmax) instead of the fused kernel, which has no
    vmap rule there and would run once per client."""
    if device.type != "cpu":
        yield
        return
    switched = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    for module in switched:
        module.fused_attn = False  # type: ignore[assignment]
    try:
        yield
    finally:
        for module in switched:
            module.fused_attn = True  # type: ignore[assignment]
