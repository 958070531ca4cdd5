"""One federated run as an item of a grid (a sweep cell, a comparison run): resumable, failures recorded.

A run folder is finished when its summary says "done" for the rounds asked for; a folder holding a
run with other settings is an error before anything trains; a run that raises (a NaN loss, say)
leaves `error.txt` and the grid goes on.
"""

from __future__ import annotations

import dataclasses
import shutil
import traceback
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from fedsens.personalize import federation, runio
from fedsens.personalize.config import FREE_SETTINGS
from fedsens.personalize.errors import ENVIRONMENT_ERRNOS, CorruptFileError, UserError
from fedsens.personalize.federation import RunConfig

# What to do about a run folder of a grid whose tables are damaged.
REDO_FIX = "redo that run with --fresh (or delete its folder)"


def read_csv(path: Path) -> pd.DataFrame:
    """A run's table, validated (runio.read_table), or an empty frame when the file is missing or holds no
    columns."""
    return runio.read_table(path, REDO_FIX) if path.exists() and path.stat().st_size > 1 else pd.DataFrame()


def final_accuracy(rounds: pd.DataFrame) -> dict[str, float]:
    """The last evaluated round's client-accuracy statistics and the best mean over rounds (NaN if none)."""
    evaluated = rounds.dropna(subset=["acc_mean"]) if "acc_mean" in rounds else rounds
    if not len(evaluated):
        return dict(
            acc_mean=float("nan"),
            acc_std=float("nan"),
            acc_p10=float("nan"),
            acc_last=float("nan"),
            acc_best=float("nan"),
        )
    last = evaluated.iloc[-1]
    return dict(
        acc_mean=float(last["acc_mean"]),
        acc_std=float(last["acc_std"]),
        acc_p10=float(last["acc_p10"]),
        acc_last=float(last["acc_mean"]),
        acc_best=float(evaluated["acc_mean"].max()),
    )


def status(folder: Path) -> str:
    """'failed', 'done', 'running' (started, not finished) or 'pending' (not started)."""
    if (folder / "error.txt").exists():
        return "failed"
    if (folder / "summary.json").exists():
        return runio.read_json(folder / "summary.json").get("status", "running")
    return "running" if (folder / "config.json").exists() else "pending"


def check_same_settings(folder: Path, wanted: RunConfig) -> None:
    """A folder that holds a run with other settings is an error, never silently reused."""
    if not (folder / "config.json").exists():
        return
    try:
        saved = RunConfig.upgrade_saved(runio.read_json(folder / "config.json")["config"])
    except CorruptFileError:
        if runio.has_checkpoint(folder / "checkpoint.pt"):
            return  # the checkpoint keeps the run's settings: resuming compares with those and rewrites config.json
        raise
    differ = sorted(k for k, v in dataclasses.asdict(wanted).items() if k not in FREE_SETTINGS and saved.get(k) != v)
    if differ:
        raise UserError(
            f"{folder} holds a run with other settings ({', '.join(differ)}); "
            "pass --fresh to redo it or choose another --out"
        )
    summary = folder / "summary.json"
    if summary.exists() and runio.read_json(summary).get("rounds", 0) > wanted.rounds:
        raise UserError(f"{folder} ran more rounds than the {wanted.rounds} asked for; pass --fresh or another --out")


def is_finished(folder: Path, wanted: RunConfig) -> bool:
    """Done for the rounds asked for, or diverged (training again would diverge again: it is seeded)."""
    if not (folder / "summary.json").exists() or (folder / "error.txt").exists():
        return False
    summary = runio.read_json(folder / "summary.json")
    if summary.get("status") == "diverged":
        return True
    return summary.get("status") == "done" and summary.get("rounds") == wanted.rounds


def run_resumable(wanted: RunConfig, hooks: Sequence = (), *, fresh: bool = False, quiet: bool = True) -> str:
    """Train (or continue) the run in `wanted.out`; returns 'done', 'skipped' or 'failed'."""
    folder = Path(wanted.out)
    if fresh and folder.exists():
        shutil.rmtree(folder)
    if is_finished(folder, wanted):
        return "skipped"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "error.txt").unlink(missing_ok=True)
    try:
        result = federation.run(wanted, hooks=hooks, resume=True, quiet=quiet)
    except OSError as err:
        if err.errno in ENVIRONMENT_ERRNOS:  # a full or read-only disk fails every run alike: stop the grid
            raise
        runio.write_text(folder / "error.txt", traceback.format_exc())
        return "failed"
    except Exception:  # noqa: BLE001 - one failing run is recorded; the grid goes on
        runio.write_text(folder / "error.txt", traceback.format_exc())
        return "failed"
    if result.summary.get("status") == "diverged":  # recorded as diverged (status); counted with the failures
        return "failed"
    return "done"


def concatenated(folders: Sequence[tuple[dict, Path]], table: str, key_columns: list[str]) -> pd.DataFrame:
    """One table of every run folder's `<table>.csv`, each row led by its run's keys (cell, method, seed ...)."""
    frames = []
    for keys, folder in folders:
        frame = read_csv(folder / f"{table}.csv")
        if len(frame):
            lead = pd.DataFrame({k: [keys[k]] * len(frame) for k in key_columns})
            frames.append(pd.concat([lead, frame], axis=1))
    columns = [*key_columns, *runio.TABLE_COLUMNS.get(table, [])]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
