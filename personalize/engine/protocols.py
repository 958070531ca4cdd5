"""Evaluation under both protocols (schema.EVAL_PROTOCOLS) as metrics.csv rows.

after-aggregation: every client with the round's aggregated shared tensors (batched).
paper (the public FedPerfix code's timing): each participant right after its local training, before
aggregation (`RoundTraining.trained`); every other client with the start-of-round shared tensors, i.e. the
previous round's aggregated model, so its row is copied from the previous round's after-aggregation row
when that round was evaluated (FedBABU's pre-evaluation fine-tuning then drew its batches with the previous
round's seed) and evaluated otherwise. Only the participants cost an extra evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from fedsens.personalize import runio
from fedsens.personalize.client import EvalResult, RunContext
from fedsens.personalize.engine.state import RESUME_FIX, RunState
from fedsens.personalize.engine.tables import metric_rows
from fedsens.personalize.evaluation import evaluate_clients
from fedsens.personalize.methods import Method


def evaluate_after_aggregation(
    ctx: RunContext, method: Method, state: RunState, round_: int, participants: set[int]
) -> list[dict]:
    """Every client with the round's aggregated shared tensors (the after-aggregation protocol), batched."""
    everyone = list(range(ctx.config.clients))
    results = evaluate_clients(ctx, method, round_, everyone, state.shared, state.local, state.extra)
    return metric_rows(round_, everyone, results, participants, "after-aggregation")


def evaluate_both(
    ctx: RunContext,
    method: Method,
    state: RunState,
    round_: int,
    trained: Mapping[int, EvalResult],
    start_shared: Mapping[str, torch.Tensor],
    previous: Mapping[int, dict],
) -> list[dict]:
    """Both protocols' rows of one round: `trained` holds the participants' results before aggregation,
    `start_shared` the start-of-round shared tensors, `previous` the previous round's after-aggregation rows."""
    participants = set(trained)
    everyone = list(range(ctx.config.clients))
    after = evaluate_after_aggregation(ctx, method, state, round_, participants)
    waiting = [c for c in everyone if c not in participants]
    copied = [
        {**previous[c], "round": round_, "participated": False, "protocol": "paper"} for c in waiting if c in previous
    ]
    fresh = [c for c in waiting if c not in previous]
    fresh_results = (
        evaluate_clients(ctx, method, round_, fresh, start_shared, state.local, state.extra) if fresh else []
    )
    paper = [
        *metric_rows(round_, list(trained), list(trained.values()), participants, "paper"),
        *metric_rows(round_, fresh, fresh_results, participants, "paper"),
        *copied,
    ]
    return after + sorted(paper, key=lambda r: r["client"])


def after_aggregation_rows(metrics: list[dict]) -> dict[int, dict]:
    """A round's after-aggregation rows by client: what the next round's paper protocol copies."""
    return {r["client"]: r for r in metrics if r["protocol"] == "after-aggregation"}


def previous_after_rows(out: Path, round_: int) -> dict[int, dict]:
    """A resumed run's after-aggregation rows of its last finished round (from metrics.csv), which the
    paper protocol copies for the next round's non-participants, exactly as an uninterrupted run does."""
    path = out / "metrics.csv"
    if round_ < 1 or not path.exists() or path.stat().st_size == 0:
        return {}
    table = runio.read_table(path, RESUME_FIX)
    rows = table[(table["round"] == round_) & (table["protocol"] == "after-aggregation")]
    return {int(r["client"]): r for r in rows.to_dict("records")}
