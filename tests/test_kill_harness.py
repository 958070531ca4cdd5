"""SIGKILL `train`, `sweep` and `compare` at seeded random moments, resume, and compare with an uninterrupted run.

CI runs the short version (a few kills per command). The full version (at least 20 kills in all):

    FEDSENS_KILLS=full .venv/bin/python -m pytest tests/test_kill_harness.py -s
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

FULL = os.environ.get("FEDSENS_KILLS") == "full"
KILLS = {"train": 10, "sweep": 6, "compare": 6} if FULL else {"train": 2, "sweep": 1, "compare": 1}
TIMING_COLUMNS = {"seconds", "seconds_per_round", "s_per_round", "wall_seconds"}
TINY = ["--dataset", "synthetic", "--model", "vit-nano", "--clients", "4", "--quiet"]
COMMANDS = {
    "train": (["train", *TINY, "--rounds", "6"], ["--resume"], ["rounds.csv", "metrics.csv"]),
    "sweep": (
        ["sweep", *TINY, "--rounds", "2", "--seeds", "0", "--parts", "head"],
        [],
        ["sensitivity.csv", "rounds.csv", "metrics.csv", "divergence.csv"],
    ),
    "compare": (
        ["compare", *TINY, "--rounds", "2", "--seeds", "0", "--methods", "fedavg,fedper"],
        [],
        ["comparison.csv", "rounds.csv", "metrics.csv"],
    ),
}


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "fedsens.cli", *args]


def _finish(args: list[str], out: Path) -> None:
    done = subprocess.run(_cli([*args, "--out", str(out)]), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def _kill_at_random(args: list[str], out: Path, rng: random.Random, kills: int) -> list[float]:
    """Start the command `kills` times, each killed (SIGKILL) after a random delay; returns the delays."""
    delays = []
    for _ in range(kills):
        proc = subprocess.Popen(_cli([*args, "--out", str(out)]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        delay = rng.uniform(2.0, 9.0)  # start-up (imports) takes a few seconds: kills land in it and in training
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        delays.append(delay)
        if proc.returncode not in (0, -signal.SIGKILL):
            stderr = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"{args[0]} exited {proc.returncode} before it was killed:\n{stderr[-2000:]}")
        if proc.stderr:
            proc.stderr.close()
    return delays


def _comparable(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path)
    return table.drop(columns=[c for c in table.columns if c in TIMING_COLUMNS]).reset_index(drop=True)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_killed_and_resumed_runs_end_with_the_tables_of_an_uninterrupted_one(tmp_path, command):
    args, resume_args, tables = COMMANDS[command]
    rng = random.Random(f"kill-{command}")
    started = time.time()
    _finish(args, tmp_path / "whole")
    killed = tmp_path / "killed"
    delays = _kill_at_random([*args, *resume_args], killed, rng, KILLS[command])
    _finish([*args, *resume_args], killed)
    print(f"{command}: {len(delays)} kills at {[round(d, 1) for d in delays]} s; {time.time() - started:.0f} s in all")
    for name in tables:
        pd.testing.assert_frame_equal(_comparable(killed / name), _comparable(tmp_path / "whole" / name))
