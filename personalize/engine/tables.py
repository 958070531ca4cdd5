"""The rows of metrics.csv and rounds.csv, the writer that appends them, and the run's summary: every
engine writes the same tables from the same functions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedsens.personalize import runio
from fedsens.personalize.client import EvalResult, RunContext
from fedsens.personalize.engine.state import RESUME_FIX, RunState
from fedsens.personalize.methods import Method
from fedsens.personalize.schema import EVAL_PROTOCOLS

ACCURACY_STATS = ("acc_mean", "acc_std", "acc_p10", "acc_min", "jain")


def accuracy_stats(acc: np.ndarray) -> dict[str, float]:
    """Mean, spread, 10th percentile, minimum and Jain's fairness of the clients' accuracies (NaN skipped)."""
    acc = acc[~np.isnan(acc)]
    if len(acc) == 0:
        return {k: float("nan") for k in ACCURACY_STATS}
    squares = float((acc**2).sum())
    return {
        "acc_mean": float(acc.mean()),
        "acc_std": float(acc.std()),
        "acc_p10": float(np.percentile(acc, 10)),
        "acc_min": float(acc.min()),
        "jain": float(acc.sum() ** 2 / (len(acc) * squares)) if squares else 1.0,
    }


def metric_rows(
    round_: int, clients: Sequence[int], results: Sequence[EvalResult], participants: set[int], protocol: str
) -> list[dict]:
    """metrics.csv's rows: one per client evaluated under `protocol`."""
    return [
        {
            "round": round_,
            "client": c,
            "split": "test",
            "loss": result.loss,
            "accuracy": result.accuracy,
            "n": result.n,
            "participated": c in participants,
            "protocol": protocol,
        }
        for c, result in zip(clients, results)
    ]


def protocol_accuracies(metrics: Sequence[Mapping]) -> dict[str, np.ndarray]:
    """Each protocol's client accuracies among a round's metric rows (empty where it was not evaluated)."""
    return {
        protocol: np.array([r["accuracy"] for r in metrics if r["protocol"] == protocol], dtype=float)
        for protocol in EVAL_PROTOCOLS
    }


def round_row(
    round_: int, accuracies: Mapping[str, np.ndarray], headline: str, *, up: int, down: int, seconds: float
) -> dict:
    """rounds.csv's row: the headline protocol's accuracy statistics, each protocol's mean, the bytes."""
    return {
        "round": round_,
        **accuracy_stats(accuracies[headline]),
        "protocol": headline,
        **{f"acc_mean_{p.replace('-', '_')}": accuracy_stats(accuracies[p])["acc_mean"] for p in EVAL_PROTOCOLS},
        "up_bytes": up,
        "down_bytes": down,
        "seconds": round(seconds, 4),
    }


class TableWriter:
    """Appends a round's rows to the run folder's tables, recording each table's size in the state (so a
    resume can cut rows written after the checkpoint). A table's columns are fixed by its first rows."""

    def __init__(self, out: Path):
        self.out = out
        self.columns: dict[str, list[str] | None] = {}

    def append(self, state: RunState, rows: Mapping[str, list[dict]]) -> None:
        for name, new in rows.items():
            path = self.out / f"{name}.csv"
            if name not in self.columns:
                self.columns[name] = _columns(path, name, new)
            columns = self.columns[name]
            if columns is None:  # a hook table with no rows yet and no declared columns
                continue
            state.table_sizes[name] = runio.append_rows(path, new, columns)


def _columns(path: Path, name: str, rows: list[dict]) -> list[str] | None:
    if name in runio.TABLE_COLUMNS:
        return runio.TABLE_COLUMNS[name]
    if path.exists() and path.stat().st_size:
        with open(path) as handle:
            return handle.readline().strip().split(",")
    return list(rows[0]) if rows else None


def read_tables(out: Path, names: Iterable[str]) -> dict[str, pd.DataFrame]:
    """The named tables of the run folder; one not written yet is written empty (with its columns)."""
    frames = {}
    for name in names:
        path = out / f"{name}.csv"
        if path.exists() and path.stat().st_size:
            frames[name] = runio.read_table(path, RESUME_FIX)
        else:
            frames[name] = pd.DataFrame(columns=runio.TABLE_COLUMNS.get(name))
            runio.write_table(path, [], list(frames[name].columns))
    return frames


def summary(
    ctx: RunContext, method: Method, rounds: pd.DataFrame, *, rounds_done: int, seconds: float, diverged: dict | None
) -> dict:
    """summary.json: the best and last accuracy, time, parameters, traffic and status of a run."""
    evaluated = rounds.dropna(subset=["acc_mean"])
    best = evaluated.loc[evaluated["acc_mean"].idxmax()] if len(evaluated) else None
    local = ctx.parts[ctx.parts["local"]]
    status = "diverged" if diverged is not None else "done" if rounds_done >= ctx.config.rounds else "running"
    record = {
        "protocol": ctx.config.eval_protocol,
        "acc_best": float(best["acc_mean"]) if best is not None else None,
        "round_best": int(best["round"]) if best is not None else None,
        "acc_last": float(evaluated["acc_mean"].iloc[-1]) if len(evaluated) else None,
        "rounds": int(rounds_done),
        "seconds": round(seconds, 2),
        "seconds_per_round": round(seconds / max(1, rounds_done), 3),
        "local_params": int(local["numel"].sum()) + method.personal_params(ctx.parts),
        "shared_params": int(ctx.parts["numel"].sum() - local["numel"].sum()),
        "comm_bytes_per_round": float((rounds["up_bytes"] + rounds["down_bytes"]).mean()) if len(rounds) else 0.0,
        "status": status,
    }
    return {**record, "diverged": diverged} if diverged is not None else record
