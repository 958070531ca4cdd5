"""The probe's cheap estimates of "keep this part local", each from one finished FedAvg run.

Every variant turns the federated model of a FedAvg run (its checkpoint) into one score per client and part
type, written as probe.csv's rows (`before`, `after`, `gain`; `gain` is the score, larger = keep it local):

- `finetune`: each client fine-tunes ONLY the part for `steps` local steps with the run's optimizer and
  learning rate; the score is the client's test accuracy after minus before. Every part of a client sees the
  same batches (one generator seed per client), so the parts' gains are paired per client.
- `fork`: a short federated continuation. The run is forked from FedAvg's checkpoint once per part, with
  that part kept local (every client's copy starts from the federated one) and everything else still
  averaged, for `fork_rounds` more rounds, and once more as plain FedAvg; the score is the client's mean
  test accuracy over those rounds (every client, with the aggregated model) minus the FedAvg fork's. This
  is the sweep's own question (a cell's tail accuracy minus FedAvg's), asked over a few rounds from a
  trained model instead of a whole run from scratch.
- `disagreement`: no training. Each client sums its gradient over `steps` batches at the federated model;
  the score of a part is one minus the cosine between the client's gradient of that part and the clients'
  mean gradient: how far the client pulls the part away from where the federation pulls it.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fedsens.personalize import runio
from fedsens.personalize.client import ClientContext, NonFiniteLoss, RunContext
from fedsens.personalize.config import RunConfig
from fedsens.personalize.engine.context import build_context
from fedsens.personalize.engine.protocols import evaluate_after_aggregation
from fedsens.personalize.engine.rounds import train_round
from fedsens.personalize.engine.state import fresh_state
from fedsens.personalize.engine.tensors import assign
from fedsens.personalize.errors import UserError
from fedsens.personalize.inputs import seeded_generator
from fedsens.personalize.methods import Method, get_method, only_trainable, train_steps

VARIANTS = ("finetune", "fork", "disagreement")
PROBE_STREAM = 3  # seeded_generator's stream for the probe's batches (1: local training, 2: evaluation)
EVAL_STREAM = 2


@dataclass(frozen=True)
class SeedProbe:
    """One seed's probe: `run` is the FedAvg run's settings reading its own partition (a copy, in `run.out`),
    `shared` the federated model of its checkpoint after `start_round` rounds."""

    run: RunConfig
    scheme: str  # the partition scheme as the sweep names it (`run.scheme` is the copied partition file)
    variant: str
    shared: Mapping[str, torch.Tensor]
    start_round: int
    parts: tuple[str, ...]
    steps: int
    fork_rounds: int

    def row(self, client: int, part: str, before: float, after: float, score: float | None = None) -> dict:
        """probe.csv's row; the score is `after - before` unless given."""
        return dict(
            dataset=self.run.dataset,
            scheme=self.scheme,
            alpha=self.run.alpha,
            seed=self.run.seed,
            client=client,
            part=part,
            before=before,
            after=after,
            gain=after - before if score is None else score,
            steps=self.fork_rounds if self.variant == "fork" else self.steps,
        )


def seed_probe(
    run: RunConfig, folder: Path, out: Path, *, variant: str, parts: tuple[str, ...], steps: int, fork_rounds: int
) -> SeedProbe:
    """The probe of the finished FedAvg run in `folder` (run settings `run`, seed included), reading a copy of
    its partition in `out/clients-s<seed>` (the sweep's folder is only read)."""
    clients_dir = out / f"clients-s{run.seed}"
    clients_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / "partition.json", clients_dir / "partition.json")
    state = runio.load_checkpoint(folder / "checkpoint.pt")
    if state["round"] < run.rounds:
        raise UserError(f"{folder} stopped at round {state['round']} of {run.rounds}; finish it before probing")
    copied = run.replace(scheme=str(clients_dir / "partition.json"), out=str(clients_dir))
    return SeedProbe(copied, run.scheme, variant, state["shared"], int(state["round"]), parts, steps, fork_rounds)


def _context(probe: SeedProbe, personalize: str = "none") -> tuple[RunConfig, Method, RunContext]:
    """The run's own context (same model, data, device) with `personalize` kept local, holding the federated
    model."""
    run = probe.run.replace(personalize=personalize)
    method = get_method(run)
    ctx = build_context(run, method, Path(run.out))
    assign(ctx.named, {n: t.to(ctx.device) for n, t in probe.shared.items()})
    return run, method, ctx


def _part_names(ctx: RunContext, parts: tuple[str, ...]) -> dict[str, set[str]]:
    return {part: set(ctx.parts.loc[ctx.parts["part"] == part, "param"]) for part in parts}


# ---- finetune ----------------------------------------------------------------------------------------


def finetune_rows(probe: SeedProbe, bar: tqdm | None = None) -> list[dict]:
    """Every client's test accuracy with the federated model, and after `steps` local steps of each part alone."""
    run, method, ctx = _context(probe)
    shared = {n: t.detach().clone() for n, t in ctx.named.items()}
    names = _part_names(ctx, probe.parts)
    after_round = probe.start_round + 1
    rows = []
    for c in range(run.clients):
        assign(ctx.named, shared)
        client = ClientContext(ctx, c, after_round, {}, seeded_generator(run.seed, after_round, c, EVAL_STREAM))
        before = method.evaluate_client(client).accuracy
        for part in probe.parts:
            assign(ctx.named, shared)
            client = ClientContext(ctx, c, after_round, {}, seeded_generator(run.seed, after_round, c, PROBE_STREAM))
            after = math.nan
            if names[part]:
                with only_trainable(ctx.model, names[part]) as params:
                    train_steps(client, params, steps=probe.steps)
                after = client.evaluate().accuracy if not client.nonfinite else math.nan
            rows.append(probe.row(c, part, before, after))
        if bar is not None:
            bar.update(1)
    assign(ctx.named, shared)
    return rows


# ---- fork ----------------------------------------------------------------------------------------------


def continued_accuracy(probe: SeedProbe, personalize: str) -> np.ndarray:
    """Clients x rounds: every client's test accuracy (aggregated model) in each of `fork_rounds` rounds
    continued from the checkpoint with `personalize` kept local; NaN from a round whose training diverged."""
    run, method, ctx = _context(probe, personalize)
    state = fresh_state(ctx, method)  # every client's local part: the federated model's
    state.round = probe.start_round
    accuracy = np.full((run.clients, probe.fork_rounds), math.nan)
    for k, round_ in enumerate(range(probe.start_round + 1, probe.start_round + probe.fork_rounds + 1)):
        try:
            training = train_round(ctx, method, state, round_)
        except NonFiniteLoss:
            break
        for row in evaluate_after_aggregation(ctx, method, state, round_, set(training.participants)):
            accuracy[int(row["client"]), k] = row["accuracy"]
        state.round = round_
    return accuracy


def fork_rows(probe: SeedProbe, bar: tqdm | None = None) -> list[dict]:
    """Each part's fork against the plain FedAvg fork: per client, the mean accuracy over the fork's rounds."""
    fedavg = continued_accuracy(probe, "none").mean(axis=1)
    if bar is not None:
        bar.update(1)
    rows: list[dict] = []
    for part in probe.parts:
        mine = continued_accuracy(probe, part).mean(axis=1)
        rows.extend(probe.row(c, part, float(fedavg[c]), float(mine[c])) for c in range(probe.run.clients))
        if bar is not None:
            bar.update(1)
    return rows


# ---- disagreement --------------------------------------------------------------------------------------


def client_gradient(ctx: RunContext, client: int, round_: int, steps: int) -> dict[str, torch.Tensor]:
    """The client's loss gradient at the current model, summed over `steps` training batches, by parameter."""
    ctx.model.train()
    ctx.model.zero_grad(set_to_none=True)
    probe = ClientContext(ctx, client, round_, {}, seeded_generator(ctx.config.seed, round_, client, PROBE_STREAM))
    for x, y in probe.train_batches(steps=steps):
        probe.loss(x, y).backward()
    return {name: p.grad.detach().flatten().clone() for name, p in ctx.model.named_parameters() if p.grad is not None}


def disagreement_rows(probe: SeedProbe, bar: tqdm | None = None) -> list[dict]:
    """Per client and part: 1 - cos(the client's gradient of the part, the clients' mean gradient of it)."""
    run, _, ctx = _context(probe)
    names = _part_names(ctx, probe.parts)
    after_round = probe.start_round + 1
    per_part: dict[str, list[torch.Tensor]] = {part: [] for part in probe.parts}
    for c in range(run.clients):
        gradient = client_gradient(ctx, c, after_round, probe.steps)
        for part in probe.parts:
            pieces = [gradient[n] for n in sorted(names[part]) if n in gradient]
            per_part[part].append(torch.cat(pieces) if pieces else torch.zeros(0))
        if bar is not None:
            bar.update(1)
    ctx.model.zero_grad(set_to_none=True)
    rows: list[dict] = []
    for part in probe.parts:
        stacked = torch.stack(per_part[part]).double()
        if stacked.shape[1] == 0:
            rows.extend(probe.row(c, part, math.nan, math.nan, math.nan) for c in range(run.clients))
            continue
        cosine = torch.nn.functional.cosine_similarity(stacked, stacked.mean(dim=0, keepdim=True), dim=1)
        rows.extend(probe.row(c, part, math.nan, math.nan, float(1 - cosine[c])) for c in range(run.clients))
    return rows


ROWS: dict[str, Callable[[SeedProbe, tqdm | None], list[dict]]] = {
    "finetune": finetune_rows,
    "fork": fork_rows,
    "disagreement": disagreement_rows,
}


def progress_total(variant: str, clients: int, parts: int) -> int:
    """The progress bar's units of one seed: clients (finetune, disagreement) or forks (fork)."""
    return parts + 1 if variant == "fork" else clients
