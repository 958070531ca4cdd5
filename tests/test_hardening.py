"""Faults a user meets: a folder in use, a corrupt checkpoint, an unwritable path, a garbled table."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedsens.cli import app
from fedsens.personalize import runio, runlock
from fedsens.personalize.errors import CorruptFileError, RunInUse

TINY = ["--dataset", "synthetic", "--model", "vit-nano", "--clients", "4", "--quiet"]

HOLD_LOCK = """
import sys, time
from fedsens.personalize import runlock
with runlock.hold(sys.argv[1], what="train"):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(folder):
    """A second process that takes the folder's lock and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_with_the_holders_pid_and_a_stale_lock_is_taken_over(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunInUse, match=rf"in use by another fedsens train \(pid {proc.pid}"):
            with runlock.hold(tmp_path):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    told = []
    with runlock.hold(tmp_path, notify=told.append):
        pass
    assert told and f"pid {proc.pid}" in told[0] and "no longer running" in told[0]
    with runlock.hold(tmp_path, notify=told.append):  # released cleanly last time: nothing to report
        pass
    assert len(told) == 1


def test_train_on_a_folder_in_use_is_one_line_exit_2(tmp_path):
    proc = _holder(tmp_path)
    try:
        result = CliRunner().invoke(app, ["train", *TINY, "--rounds", "1", "--out", str(tmp_path)])
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert result.exit_code == 2, result.output
    assert f"pid {proc.pid}" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "protocol.json").exists()  # the refused process wrote nothing into the held folder


def _save_rounds(path, rounds):
    for r in rounds:
        runio.save_checkpoint(path, {"round": r})


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),  # truncated
        lambda p: p.write_bytes(os.urandom(300)),  # random bytes
        lambda p: p.write_bytes(b""),  # zero bytes
        lambda p: p.with_name(p.name + ".sha256").unlink(),  # killed before the checksum landed
    ],
    ids=["truncated", "random", "empty", "no-checksum"],
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_and_says_so(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    _save_rounds(path, [1, 2])
    damage(path)
    told = []
    assert runio.load_checkpoint(path, notify=told.append) == {"round": 1}
    assert told and "previous checkpoint" in told[0]


def test_no_good_checkpoint_says_start_over(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _save_rounds(path, [1, 2])
    path.write_bytes(b"x")
    runio.previous_checkpoint(path).write_bytes(b"y")
    with pytest.raises(CorruptFileError, match="--overwrite"):
        runio.load_checkpoint(path)


def _garbage_latest(out):
    (out / "checkpoint.pt").write_bytes(b"garbage")  # round 2's checkpoint is lost; round 1's remains


def _latest_moved_aside(out):
    # a third save killed right after it moved round 2's file aside: its digest still has the latest's name
    os.replace(out / "checkpoint.pt", out / "checkpoint.prev.pt")


@pytest.mark.parametrize("damage", [_garbage_latest, _latest_moved_aside], ids=["corrupt", "moved-aside"])
def test_resume_from_the_previous_checkpoint_ends_like_an_uninterrupted_run(tmp_path, damage):
    runner = CliRunner()
    whole = tmp_path / "whole"
    assert runner.invoke(app, ["train", *TINY, "--rounds", "3", "--out", str(whole)]).exit_code == 0
    cut = tmp_path / "cut"
    assert runner.invoke(app, ["train", *TINY, "--rounds", "2", "--out", str(cut)]).exit_code == 0
    damage(cut)
    result = runner.invoke(app, ["train", *TINY, "--rounds", "3", "--out", str(cut), "--resume"])
    assert result.exit_code == 0, result.output
    assert "resuming from the previous checkpoint" in result.output  # not a start over
    columns = ["round", "acc_mean", "acc_std", "up_bytes"]
    pd.testing.assert_frame_equal(
        pd.read_csv(cut / "rounds.csv")[columns], pd.read_csv(whole / "rounds.csv")[columns], check_exact=False
    )


def test_overwrite_leaves_no_checkpoint_of_the_old_run_to_fall_back_to(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    assert runner.invoke(app, ["train", *TINY, "--rounds", "2", "--out", str(out)]).exit_code == 0
    assert (out / "checkpoint.prev.pt").exists()
    assert runner.invoke(app, ["train", *TINY, "--rounds", "1", "--out", str(out), "--overwrite"]).exit_code == 0
    assert not (out / "checkpoint.prev.pt").exists()  # the old run's round 2 would have been kept there


def test_resume_with_both_checkpoints_corrupt_is_one_line(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    assert runner.invoke(app, ["train", *TINY, "--rounds", "2", "--out", str(out)]).exit_code == 0
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (out / name).write_bytes(b"")
    result = runner.invoke(app, ["train", *TINY, "--rounds", "2", "--out", str(out), "--resume"])
    assert result.exit_code == 2 and "--overwrite" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("where", ["/sys/fedsens-test-run", "a-file"])
def test_an_unusable_out_is_one_line_exit_2(tmp_path, where):
    out = tmp_path / where if where == "a-file" else where
    if where == "a-file":
        out.write_text("not a folder")
    result = CliRunner().invoke(app, ["train", *TINY, "--rounds", "1", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert str(out) in result.output and "Traceback" not in result.output


def test_resume_names_the_setting_that_differs_and_says_when_it_extends(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    assert runner.invoke(app, ["train", *TINY, "--rounds", "1", "--out", str(out)]).exit_code == 0
    refused = runner.invoke(app, ["train", *TINY, "--rounds", "1", "--lr", "0.5", "--out", str(out), "--resume"])
    assert refused.exit_code == 2 and "lr 0.003 -> 0.5" in refused.output
    extended = runner.invoke(app, ["train", *TINY, "--rounds", "2", "--out", str(out), "--resume"])
    assert extended.exit_code == 0 and "extending the run from 1 to 2 rounds" in extended.output


def test_a_garbled_json_is_a_corrupt_file_naming_it(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text('{"acc_last": 0.5, ')
    with pytest.raises(CorruptFileError, match="summary.json is unreadable"):
        runio.read_json(path)


def test_the_lock_is_released_when_the_holder_is_killed_mid_run(tmp_path):
    """SIGKILL a training process; the next resume takes the lock over and finishes."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedsens.cli", "train", *TINY, "--rounds", "30", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt.sha256").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.kill()
    proc.wait(timeout=30)
    result = CliRunner().invoke(app, ["train", *TINY, "--rounds", "30", "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    assert f"took over the lock left by pid {proc.pid}" in result.output
    assert len(pd.read_csv(out / "rounds.csv")) == 30


def _finished_run(tmp_path, rounds=2):
    out = tmp_path / "run"
    assert CliRunner().invoke(app, ["train", *TINY, "--rounds", str(rounds), "--out", str(out)]).exit_code == 0
    return out


def test_a_report_on_a_metrics_table_cut_mid_line_says_what_it_used(tmp_path):
    out = _finished_run(tmp_path)
    text = (out / "metrics.csv").read_bytes()
    (out / "metrics.csv").write_bytes(text[: len(text) - 25])  # the copy broke inside the last row
    result = CliRunner().invoke(app, ["report", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    html = (out / "report" / "index.html").read_text()
    assert "metrics.csv ends mid-line" in html
    assert "metrics.csv&#x27;s last round 2 holds 3 of 4 clients" in html or "last round 2 holds 3 of 4" in html


def test_a_report_on_a_garbled_or_columnless_table_is_one_line(tmp_path):
    out = _finished_run(tmp_path)
    (out / "rounds.csv").write_text("nothing,useful\n1,2\n")
    result = CliRunner().invoke(app, ["report", str(out), "--quiet"])
    assert result.exit_code == 2 and "lacks the column(s) round, acc_mean" in result.output
    assert "Traceback" not in result.output


def test_report_on_a_file_says_it_is_a_file(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("# not a run")
    result = CliRunner().invoke(app, ["report", str(path)])
    assert result.exit_code == 2 and "is a file" in result.output


def test_the_training_curve_band_stays_within_0_and_1():
    from fedsens.reports.figures import plot_training_curves

    rounds = pd.DataFrame({"round": [1, 2, 3], "acc_mean": [0.05, 0.5, 0.97], "acc_std": [0.2, 0.1, 0.2]})
    fig = plot_training_curves(rounds)
    band = fig.axes[0].collections[0]
    ys = [vertex[1] for path in band.get_paths() for vertex in path.vertices]
    assert min(ys) >= 0.0 and max(ys) <= 1.0


def test_too_many_clients_names_a_count_that_works(tmp_path):
    import re

    runner = CliRunner()
    too_many = runner.invoke(
        app, ["train", "--clients", "5000", "--scheme", "iid", "--rounds", "1", "--quiet", "--out", str(tmp_path)]
    )
    assert too_many.exit_code == 2
    suggested = int(re.search(r"use at most (\d+) clients", too_many.output).group(1))
    again = runner.invoke(
        app, ["data", "split", "--scheme", "iid", "--clients", str(suggested), "--quiet", "--out", str(tmp_path / "p")]
    )
    assert again.exit_code == 0, again.output  # the suggestion is one that works


def test_a_diverging_run_stops_cleanly_exit_3_and_the_report_says_so(tmp_path):
    out = tmp_path / "run"
    args = ["train", *TINY, "--rounds", "4", "--lr", "1e6", "--optimizer", "sgd", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.output
    assert "diverged" in result.output and "lower --lr" in result.output and "Traceback" not in result.output
    summary = runio.read_json(out / "summary.json")
    assert summary["status"] == "diverged" and summary["diverged"]["round"] >= 1
    rounds = pd.read_csv(out / "rounds.csv")
    assert len(rounds) == summary["diverged"]["round"] - 1  # the tables hold the rounds before it
    report = CliRunner().invoke(app, ["report", str(out), "--quiet"])
    assert report.exit_code == 0, report.output
    assert "Status: diverged" in (out / "report" / "index.html").read_text()


def test_a_diverging_cell_is_recorded_and_the_sweep_goes_on(tmp_path):
    from fedsens.personalize.config import RunConfig
    from fedsens.sensitivity.sweep import SweepConfig, run_sweep

    run = RunConfig(dataset="synthetic", model="vit-nano", clients=4, rounds=2, lr=1e6, optimizer="sgd")
    config = SweepConfig(run=run, parts=("head",), seeds=(0,), out=str(tmp_path / "sweep"), quiet=True, force=True)
    result = run_sweep(config)
    assert set(result.sensitivity["status"]) == {"diverged"}
    again = run_sweep(config)  # diverged cells are results: nothing is trained again
    assert again.ran == () and len(again.skipped) == 2


def test_a_sweep_folder_in_use_is_refused(tmp_path):
    proc = _holder(tmp_path / "sweep")
    try:
        result = CliRunner().invoke(
            app, ["sweep", *TINY, "--rounds", "1", "--seeds", "0", "--out", str(tmp_path / "sweep")]
        )
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert result.exit_code == 2 and f"pid {proc.pid}" in result.output, result.output


@pytest.mark.parametrize("content", ["", "part,score,rank,metric\n"])
def test_personalize_auto_from_an_empty_ranking_is_one_line(tmp_path, content):
    (tmp_path / "ranking.csv").write_text(content)
    args = [
        "train",
        *TINY,
        "--rounds",
        "1",
        "--personalize",
        "auto",
        "--from",
        str(tmp_path),
        "--out",
        str(tmp_path / "r"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "ranking.csv" in result.output or "ranked no part" in result.output


def test_personalize_auto_from_a_run_folder_says_it_is_a_run(tmp_path):
    out = _finished_run(tmp_path, rounds=1)
    args = ["train", *TINY, "--rounds", "1", "--personalize", "auto", "--from", str(out), "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "is a run folder" in result.output and "fedsens sweep" in result.output


class _Killed(BaseException):
    """A kill at one of save_checkpoint's renames (a SIGKILL runs no cleanup; the temporaries left then are
    never read, so removing them as this exception does changes nothing that matters)."""


@pytest.mark.parametrize("saved_before", [0, 1, 2])
def test_a_save_killed_at_any_rename_leaves_a_checkpoint_to_resume_from_or_none_to_start_over(
    tmp_path, monkeypatch, saved_before
):
    real_replace = os.replace
    renames = [0]

    def counted(a, b):
        renames[0] += 1
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", counted)
    (tmp_path / "count").mkdir()
    _save_rounds(tmp_path / "count" / "checkpoint.pt", range(1, saved_before + 2))
    assert renames[0] >= 2 * (saved_before + 1)  # the digest's and the file's, at least, per save
    for kill_at in range(renames[0] + 1):  # every rename of every save in turn, and none
        path = tmp_path / f"kill{kill_at}" / "checkpoint.pt"
        path.parent.mkdir()
        left = [kill_at]

        def killing(a, b, left=left):
            if left[0] == 0:
                raise _Killed
            left[0] -= 1
            real_replace(a, b)

        monkeypatch.setattr(os, "replace", killing)
        done = 0
        with contextlib.suppress(_Killed):
            for r in range(1, saved_before + 2):
                runio.save_checkpoint(path, {"round": r})
                done = r
        monkeypatch.setattr(os, "replace", real_replace)
        if not runio.has_checkpoint(path):
            assert done == 0, f"killed at rename {kill_at} after {done} saves: no checkpoint is left"
            continue
        assert runio.load_checkpoint(path)["round"] in (done, done + 1), f"killed at rename {kill_at}"
