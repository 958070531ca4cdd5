"""Many clients evaluated in one forward.

`evaluate_clients` evaluates a given list of clients under given shared and per-client tensors, at
any moment of a round. Evaluating clients one at a time costs one small forward per client, with
Python's per-module overhead dominating at thousands of clients; here:

- clients that share every tensor go through the model together, in one pass over all their test data;
- clients whose only own tensors are the classifier head's weight (and bias) share one pass through the body,
  and each client's head is applied to its own features (one batched matrix product); anything else of the
  head's kept local (a LoRA delta, an adapter, the bias alone) takes the functional path below;
- otherwise chunks of clients run together functionally (`torch.func.vmap` over `functional_call`,
  each client's local tensors stacked along a leading dimension, test batches padded and masked).

Per-client loss and accuracy are what the one-at-a-time path gives, to float tolerance. Methods whose
evaluation adapts per client (they override `Method.evaluate_client`, so `Method.evaluates_plainly` is
False) keep the per-client path.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from fedsens.personalize.client import ClientContext, EvalResult, RunContext
from fedsens.personalize.clientstore import ClientStore
from fedsens.personalize.engine.tensors import assign
from fedsens.personalize.inputs import seeded_generator
from fedsens.personalize.methods import Method

SAMPLES_PER_FORWARD = 512  # the one-at-a-time path's test batch
# A chunk of clients evaluated together also holds its clients' local tensors (read from the disk store,
# or gathered when the clients are not consecutive): bounded, so that memory does not grow with them.
LOCAL_BYTES_PER_FORWARD = 32 * 2**20


def evaluate_clients(
    ctx: RunContext,
    method: Method,
    round_: int,
    clients: Sequence[int],
    shared: Mapping[str, torch.Tensor],
    local: ClientStore,
    extra: ClientStore,
    *,
    batched: bool = True,
) -> list[EvalResult]:
    """Each listed client's test loss and accuracy with the shared tensors `shared` and its own from `local`."""
    assign(ctx.named, shared)
    ctx.model.eval()
    if batched and method.evaluates_plainly:
        with torch.no_grad():  # methods that adapt (per-client path below) need gradients
            if not ctx.local_names:
                return _together(ctx, clients)
            head = _head_prefix(ctx)
            if head is not None and {head + "weight"} <= set(ctx.local_names) <= {head + "weight", head + "bias"}:
                return _shared_body(ctx, clients, local, head)
            return _functional(ctx, clients, local)
    results = []
    for c in clients:
        assign(ctx.named, local.client(c))
        client = ClientContext(ctx, c, round_, extra.client(c), seeded_generator(ctx.config.seed, round_, c, 2))
        results.append(method.evaluate_client(client))
        if ctx.model.training:
            ctx.model.eval()
    return results


def _head_prefix(ctx: RunContext) -> str | None:
    model = ctx.model
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        return None
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if get_classifier else None
    if not isinstance(head, torch.nn.Linear):
        return None
    for name, module in model.named_modules():
        if module is head:
            return name + "."
    return None


def _test_index(ctx: RunContext, clients: Sequence[int]) -> tuple[torch.Tensor, np.ndarray]:
    """All listed clients' test samples in order, and each sample's position in `clients`."""
    parts = [np.asarray(ctx.partition.test[c], dtype=np.int64) for c in clients]
    owner = np.repeat(np.arange(len(clients)), [len(p) for p in parts])
    index = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(index), owner


def _results(loss: torch.Tensor, correct: torch.Tensor, owner: np.ndarray, count: int) -> list[EvalResult]:
    """Per-client mean loss and accuracy from per-sample values."""
    who = torch.from_numpy(owner)
    n = torch.bincount(who, minlength=count).tolist()
    loss_sum = torch.zeros(count, dtype=torch.float64).index_add_(0, who, loss.double()).tolist()
    right = torch.zeros(count, dtype=torch.float64).index_add_(0, who, correct.double()).tolist()
    return [
        EvalResult(loss_sum[k] / n[k], right[k] / n[k], n[k]) if n[k] else EvalResult(float("nan"), float("nan"), 0)
        for k in range(count)
    ]


def _prepared(ctx: RunContext, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    index = index.to(ctx.images.device)
    return ctx.prepare(ctx.images[index]), ctx.labels[index]


def _together(ctx: RunContext, clients: Sequence[int]) -> list[EvalResult]:
    index, owner = _test_index(ctx, clients)
    losses, correct = [], []
    for start in range(0, len(index), SAMPLES_PER_FORWARD):
        x, y = _prepared(ctx, index[start : start + SAMPLES_PER_FORWARD])
        with ctx.autocast():
            logits = ctx.model(x).float()
        losses.append(F.cross_entropy(logits, y, reduction="none").cpu())
        correct.append((logits.argmax(1) == y).cpu())
    return _finish(losses, correct, owner, len(clients))


def _finish(losses: list, correct: list, owner: np.ndarray, count: int) -> list[EvalResult]:
    if not losses:
        return _results(torch.zeros(0), torch.zeros(0), owner, count)
    return _results(torch.cat(losses), torch.cat(correct), owner, count)


def _shared_body(ctx: RunContext, clients: Sequence[int], local: ClientStore, head: str) -> list[EvalResult]:
    """One pass through the shared body for every client; each client's head on its own features."""
    model: Any = ctx.model  # a timm model: forward_features and forward_head (checked by _head_prefix)
    index, owner = _test_index(ctx, clients)
    owner_t = torch.from_numpy(owner)
    weight_name, bias_name = head + "weight", head + "bias"
    losses, correct = [], []
    for start in range(0, len(index), SAMPLES_PER_FORWARD):
        x, y = _prepared(ctx, index[start : start + SAMPLES_PER_FORWARD])
        rows = [clients[k] for k in owner_t[start : start + SAMPLES_PER_FORWARD].tolist()]
        heads = local.rows(rows)  # each sample's client's head (views of a few KB per sample)
        with ctx.autocast():
            features = model.forward_head(model.forward_features(x), pre_logits=True).float()
        weight = heads[weight_name].to(features.device, torch.float32)
        logits = torch.bmm(weight, features.unsqueeze(2)).squeeze(2)
        if bias_name in heads:
            logits = logits + heads[bias_name].to(features.device, torch.float32)
        losses.append(F.cross_entropy(logits, y, reduction="none").cpu())
        correct.append((logits.argmax(1) == y).cpu())
    return _finish(losses, correct, owner, len(clients))


def _functional(ctx: RunContext, clients: Sequence[int], local: ClientStore) -> list[EvalResult]:
    """Chunks of clients in one vmapped functional forward, each with its own local tensors."""
    sizes = [len(ctx.partition.test[c]) for c in clients]
    most_clients = max(1, LOCAL_BYTES_PER_FORWARD // max(1, local.row_bytes))
    results: list[EvalResult] = []
    start = 0
    while start < len(clients):
        widest = max(sizes[start], 1)
        stop = start + 1
        while (
            stop < len(clients)
            and stop - start < most_clients
            and (stop - start + 1) * max(widest, sizes[stop]) <= SAMPLES_PER_FORWARD
        ):
            widest = max(widest, sizes[stop])
            stop += 1
        results.extend(_functional_chunk(ctx, clients[start:stop], local))
        start = stop
    return results


def _functional_chunk(ctx: RunContext, clients: Sequence[int], local: ClientStore) -> list[EvalResult]:
    sizes = [len(ctx.partition.test[c]) for c in clients]
    width = max(sizes)
    if width == 0:
        return [EvalResult(float("nan"), float("nan"), 0) for _ in clients]
    pad = [np.resize(np.asarray(ctx.partition.test[c], dtype=np.int64), width) if n else np.zeros(width, np.int64)
           for c, n in zip(clients, sizes)]  # fmt: skip
    index = torch.from_numpy(np.stack(pad)).reshape(-1)
    x, y = _prepared(ctx, index)
    x = x.reshape(len(clients), width, *x.shape[1:])
    y = y.reshape(len(clients), width)
    stacked = {n: t.to(ctx.device) for n, t in local.rows(clients).items()}

    def forward(own: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        return functional_call(ctx.model, own, (images,), strict=False)

    with ctx.autocast(), warnings.catch_warnings():
        # CPU attention has no vmap rule yet and falls back to a loop over the chunk: still correct.
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        logits = vmap(forward)(stacked, x).float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").reshape(y.shape)
    right = logits.argmax(-1) == y
    mask = torch.arange(width, device=y.device)[None, :] < torch.tensor(sizes, device=y.device)[:, None]
    owner = np.repeat(np.arange(len(clients)), sizes)
    return _results(loss[mask].cpu(), right[mask].cpu(), owner, len(clients))
