"""SIGKILL `train`, `sweep` and `compare` at seeded random moments, and Ctrl-C (SIGINT to the process group)
`sweep --jobs 2` and `compare` while they train; resume, and compare with an uninterrupted run. Each test
prints its counts: tried / clear (resumed into the uninterrupted run's tables) / traceback / silent (other
tables) / lost (an interrupt that did not stop the command within seconds, or queued runs that still started).

CI runs the short version (a few kills per command). The full version (at least 20 kills in all):

    FEDSENS_KILLS=full .venv/bin/python -m pytest tests/test_kill_harness.py -s
"""

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

FULL = os.environ.get("FEDSENS_KILLS") == "full"
KILLS = {"train": 10, "sweep": 6, "compare": 6} if FULL else {"train": 2, "sweep": 1, "compare": 1}
INTERRUPTS = 3 if FULL else 1
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


def _counts(outcome: Counter) -> dict[str, int]:
    return {"tried": sum(outcome.values()), **{k: outcome[k] for k in ("clear", "traceback", "silent", "lost")}}


def _same_tables(folder: Path, whole: Path, tables: list[str]) -> bool:
    try:
        for name in tables:
            pd.testing.assert_frame_equal(_comparable(folder / name), _comparable(whole / name))
    except AssertionError:
        return False
    return True


@pytest.mark.parametrize("command", list(COMMANDS))
def test_killed_and_resumed_runs_end_with_the_tables_of_an_uninterrupted_one(tmp_path, command):
    args, resume_args, tables = COMMANDS[command]
    rng = random.Random(f"kill-{command}")
    started = time.time()
    _finish(args, tmp_path / "whole")
    killed = tmp_path / "killed"
    delays = _kill_at_random([*args, *resume_args], killed, rng, KILLS[command])
    _finish([*args, *resume_args], killed)
    same = _same_tables(killed, tmp_path / "whole", tables)
    counts = _counts(Counter({"clear" if same else "silent": len(delays)}))
    print(
        f"{command}: {len(delays)} kills at {[round(d, 1) for d in delays]} s; {counts}; {time.time() - started:.0f} s"
    )
    for name in tables:
        pd.testing.assert_frame_equal(_comparable(killed / name), _comparable(tmp_path / "whole" / name))


# Ctrl-C while runs train in a pool: the command stops within seconds and starts no queued run.
INTERRUPTED = {
    "sweep --jobs 2": (
        [
            *("sweep", *TINY, "--rounds", "2", "--seeds", "0", "--jobs", "2", "--only-parts"),
            *(x for part in ("head", "attn", "mlp", "norm", "embed", "all") for x in ("--parts", part)),
        ],
        ["sensitivity.csv", "rounds.csv", "metrics.csv"],
    ),
    "compare": (
        ["compare", *TINY, "--rounds", "2", "--seeds", "0", "--methods", "fedavg,fedper,fedbn,local,fedrep,fedbabu"],
        ["comparison.csv", "rounds.csv", "metrics.csv"],
    ),
}
# A run a worker took just before the signal may write its config.json after the test looked (it writes it
# once its data and model are built, seconds later on a loaded machine), one per worker: the two workers
# finish their equal first runs together (seen once in the whole suite: two late starts). Six runs leave four
# queued behind the two running, so a pool that went on with its queue is still caught.
LATE_ALLOWED = 2
# Seconds from Ctrl-C to exit: 6-9 s measured alone on the busy 2-core machine (load ~9), past 20 s inside the
# whole suite there; before the fix the pool went on to train every queued cell (the late-start check below).
STOP_WITHIN = 60.0


def _started(folder: Path) -> set[str]:
    return {p.parent.name for p in folder.glob("*/*/config.json")}


def _checkpointed(folder: Path) -> set[str]:
    return {p.parent.name for p in folder.glob("*/*/checkpoint.pt.sha256")}


def _interrupt_once(args: list[str], out: Path, wait_for: int) -> tuple[str, str]:
    """Start the command, Ctrl-C it once `wait_for` runs hold a checkpoint; its outcome and why."""
    proc = subprocess.Popen(
        _cli([*args, "--out", str(out)]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.time() + 300
    while len(_checkpointed(out)) < wait_for and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    if proc.poll() is not None:
        return "clear", "finished before the interrupt"
    started_before = _started(out)
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.time()
    try:
        proc.wait(timeout=STOP_WITHIN)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        return "lost", f"still running {STOP_WITHIN:.0f} s after Ctrl-C"
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if "Traceback" in stderr:
        return "traceback", stderr[-1500:]
    late = _started(out) - started_before
    if len(late) > LATE_ALLOWED:
        return "lost", f"queued runs {sorted(late)} started after Ctrl-C"
    return "ok", f"exit {proc.returncode} {time.time() - sent:.1f} s after Ctrl-C"


@pytest.mark.parametrize("command", list(INTERRUPTED))
def test_ctrl_c_cancels_queued_runs_and_a_rerun_ends_with_the_uninterrupted_tables(tmp_path, command):
    args, tables = INTERRUPTED[command]
    _finish([*args, "--jobs", "1"], tmp_path / "whole")  # in this process: the tables do not depend on where
    outcome: Counter = Counter()
    notes = []
    folder = tmp_path / "interrupted"
    for attempt in range(INTERRUPTS):
        kind, why = _interrupt_once(args, folder, wait_for=attempt + 2)
        notes.append(why)
        if kind != "ok":
            outcome[kind] += 1
    _finish([*args, "--jobs", "1"], folder)  # the rerun resumes in this process: no second pool to start
    same = _same_tables(folder, tmp_path / "whole", tables)
    outcome["clear" if same else "silent"] += INTERRUPTS - sum(outcome.values())
    print(f"{command}: {INTERRUPTS} Ctrl-C: {notes}; {_counts(outcome)}")
    assert outcome["traceback"] == outcome["silent"] == outcome["lost"] == 0, notes
