"""Issue 27's table of faults, one test per row: full disks, damaged tables, edited settings, odd image files,
a preset that would override the user, bad option values, interrupts, a dead Ray address, a user's file.

The disk cases mount a small tmpfs (the test runs as root on Linux) and are skipped where mounting is refused.
"""

import contextlib
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from fedsens.cli import app
from fedsens.personalize import runio
from fedsens.personalize.errors import CorruptFileError, UserError

TINY = ["--dataset", "synthetic", "--model", "vit-nano", "--clients", "4", "--quiet"]
TIMING = ["seconds"]
CHECKPOINT_BYTES = 260_000  # vit-nano's checkpoint with 4 clients: ~250 KB


def _train(out, *extra, rounds=2):
    return CliRunner().invoke(app, ["train", *TINY, "--rounds", str(rounds), "--out", str(out), *extra])


def _one_line_error(result, *fragments):
    """Exit 2, no traceback, one `error:` line holding every fragment."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _tables(out):
    return {
        name: pd.read_csv(out / f"{name}.csv").drop(columns=TIMING, errors="ignore") for name in ("rounds", "metrics")
    }


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted 3-round run: what every interrupted and resumed run must end as."""
    out = tmp_path_factory.mktemp("whole") / "run"
    assert _train(out, rounds=3).exit_code == 0
    return _tables(out)


def _same_tables(out, whole):
    for name, table in _tables(out).items():
        pd.testing.assert_frame_equal(table, whole[name])


@contextlib.contextmanager
def _tmpfs(folder: Path, size: str):
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """A file taking all of the disk's space but `leave` bytes."""
    stats = os.statvfs(disk)
    free = stats.f_bavail * stats.f_frsize
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(0, free - leave))
    return filler


def _strays(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*.tmp")]


# ---- full disks ------------------------------------------------------------------------------------------


def test_a_full_disk_is_one_line_leaves_no_temporary_and_resume_after_freeing_continues_exactly(tmp_path, whole):
    with _tmpfs(tmp_path / "disk", "4m") as disk:
        out = disk / "run"
        filler = _fill(disk, 2 * CHECKPOINT_BYTES + 120_000)  # room for two checkpoints, not for the third
        line = _one_line_error(_train(out, rounds=3), str(out), "no space left")
        assert "--out" in line and _strays(out) == []
        still_full = _train(out, "--resume", rounds=3)  # with the disk still full: one line, not an OSError
        _one_line_error(still_full, str(out), "no space left")
        assert _strays(out) == []
        filler.unlink()
        resumed = _train(out, "--resume", rounds=3)
        assert resumed.exit_code == 0, resumed.output
        _same_tables(out, whole)


def test_a_report_on_a_full_disk_is_one_line_and_leaves_no_half_written_page(tmp_path):
    with _tmpfs(tmp_path / "disk", "4m") as disk:
        out = disk / "run"
        assert _train(out, rounds=1).exit_code == 0
        for name in ("checkpoint.pt", "checkpoint.prev.pt"):
            (out / name).unlink(missing_ok=True)  # room for the run's tables only
        _fill(disk, 20_000)
        result = CliRunner().invoke(app, ["report", str(out), "--quiet"])
        line = _one_line_error(result, "no space left")
        assert "--out" not in line  # report has no --out: the advice fits the command
        assert not (out / "report" / "index.html").exists() and _strays(out) == []


def test_a_read_only_folder_gives_advice_that_fits_each_command(tmp_path):
    with _tmpfs(tmp_path / "disk", "4m") as disk:
        out = disk / "run"
        assert _train(out, rounds=1).exit_code == 0
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        report = _one_line_error(CliRunner().invoke(app, ["report", str(out), "--quiet"]), "read-only")
        assert "--out" not in report and "copy the folder" in report
        resume = _one_line_error(_train(out, "--resume", rounds=2), "read-only")
        assert "--out" in resume


def test_an_oserror_without_a_file_name_gets_the_path_being_written(tmp_path):
    import errno

    def fail(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a library's writer raises it: no file name

    target = tmp_path / "table.csv"
    with pytest.raises(OSError) as err:
        runio.replace_atomically(target, fail)
    assert err.value.filename == str(target) and list(tmp_path.iterdir()) == []


# ---- damaged tables ----------------------------------------------------------------------------------------


def _damage(path: Path, offset_line: int, garbage: bytes) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[offset_line] = lines[offset_line][:3] + garbage + lines[offset_line][3 + len(garbage) :]
    path.write_bytes(b"\n".join(lines))


@pytest.fixture
def two_rounds(tmp_path):
    out = tmp_path / "run"
    assert _train(out, rounds=2).exit_code == 0
    return out


def test_non_utf8_bytes_in_metrics_then_resume_is_one_line_naming_the_file(two_rounds):
    _damage(two_rounds / "metrics.csv", 5, bytes(range(0xE0, 0xF0)))
    _one_line_error(_train(two_rounds, "--resume", rounds=3), "metrics.csv", "not UTF-8")


def test_ascii_garbage_in_a_middle_row_is_noticed_by_resume_and_report(two_rounds):
    _damage(two_rounds / "metrics.csv", 5, b"xQkzpLmNvbRtwe")
    _one_line_error(_train(two_rounds, "--resume", rounds=3), "metrics.csv", "line")
    _one_line_error(CliRunner().invoke(app, ["report", str(two_rounds), "--quiet"]), "metrics.csv", "line")


def test_a_deleted_rounds_table_is_refused_on_resume_not_rewritten_from_round_3(two_rounds):
    (two_rounds / "rounds.csv").unlink()
    _one_line_error(_train(two_rounds, "--resume", rounds=3), "rounds.csv", "missing", "--overwrite")
    assert not (two_rounds / "rounds.csv").exists()


def test_a_damaged_or_deleted_config_json_resumes_from_the_checkpoints_own_settings(tmp_path, whole):
    out = tmp_path / "run"
    assert _train(out, rounds=2).exit_code == 0
    (out / "config.json").write_text('{"config": {"lr": ')
    resumed = _train(out, "--resume", rounds=3)
    assert resumed.exit_code == 0, resumed.output
    _same_tables(out, whole)
    assert runio.read_json(out / "config.json")["config"]["rounds"] == 3  # written again, whole
    (out / "config.json").unlink()
    assert _train(out, "--resume", rounds=3).exit_code == 0


def test_an_edited_config_json_cannot_smuggle_in_another_learning_rate(two_rounds):
    config = runio.read_json(two_rounds / "config.json")
    config["config"]["lr"] = 0.01
    runio.write_json(two_rounds / "config.json", config)
    _one_line_error(_train(two_rounds, "--resume", "--lr", "0.01", rounds=3), "lr 0.003 -> 0.01")


def test_the_table_reader_checks_types_choices_and_columns(tmp_path):
    path = tmp_path / "rounds.csv"
    path.write_text("round,acc_mean\n1,0.5\n")
    with pytest.raises(CorruptFileError, match="no column acc_std"):
        runio.read_table(path, "fix it")
    path = tmp_path / "metrics.csv"
    header = "round,client,split,loss,accuracy,n,participated,protocol\n"
    path.write_text(header + "1,0,test,0.1,0.5,9,True,after-aggregation\n1,1,test,0.1,0.5,9,True,papr\n")
    with pytest.raises(CorruptFileError, match="line 3: protocol 'papr'"):
        runio.read_table(path, "fix it")
    path.write_text(header + "1,0,test,0.1,0.5,9,Maybe,paper\n")
    with pytest.raises(CorruptFileError, match="participated 'Maybe' is not True or False"):
        runio.read_table(path, "fix it")


# ---- odd input trees and image files --------------------------------------------------------------------


def _office_tree(root: Path) -> None:
    for domain, classes in {"Art": {"apple": 3, "bike": 2}}.items():
        for name, count in classes.items():
            folder = root / domain / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(folder / f"{i}.png")


def test_a_symlink_loop_inside_office_home_is_one_line_naming_the_link(tmp_path):
    from fedsens.personalize import datasets as data

    _office_tree(tmp_path)
    (tmp_path / "Art" / "apple" / "loop").symlink_to("..")
    with pytest.raises(UserError, match=r"symbolic link loop: .*apple/loop -> \.\."):
        data.load("officehome", tmp_path, size=8, quiet=True)


def test_a_folder_linked_twice_is_read_once(tmp_path):
    from fedsens.personalize import datasets as data

    _office_tree(tmp_path)
    (tmp_path / "Art" / "bike" / "again").symlink_to(tmp_path / "Art" / "apple")  # not a loop, a second path
    office = data.load("officehome", tmp_path, size=8, quiet=True)
    assert len(office.labels) == 5


def test_a_data_root_that_is_a_symlink_loop_says_so(tmp_path):
    from fedsens.personalize import datasets as data

    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(UserError, match="is a symbolic link loop"):
        data.load("officehome", tmp_path / "a", size=8, quiet=True)


def test_a_16_bit_greyscale_png_is_scaled_to_8_bits(tmp_path):
    from fedsens.personalize.datasets.officehome import read_rgb

    grey = (np.arange(64 * 64).reshape(64, 64) % 65536 * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(grey).save(tmp_path / "wide.png")
    Image.fromarray(np.rint(grey / 257).astype(np.uint8)).save(tmp_path / "narrow.png")
    wide = np.asarray(read_rgb(str(tmp_path / "wide.png"), 64), dtype=float)
    narrow = np.asarray(read_rgb(str(tmp_path / "narrow.png"), 64), dtype=float)
    assert abs(wide.mean() - narrow.mean()) < 1.0 and abs(wide.mean() - 127.5) < 2


# ---- option values and presets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--method", "fedperfix", "-o", "scale=nan"], "must be a finite number"),
        (["--method", "fedperfix", "-o", "scale=inf"], "must be a finite number"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--alpha", "inf"], "--alpha must be a finite number"),
    ],
)
def test_non_finite_option_values_are_refused_before_training(tmp_path, args, fragment):
    _one_line_error(_train(tmp_path / "run", *args, rounds=1), fragment)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_the_users_options_win_over_a_preset_in_train_sweep_and_compare():
    from fedsens.commands import compare, sweep, train
    from fedsens.sensitivity.compare import run_config

    given = dict(
        dataset=None,
        data_root=None,
        partition=None,
        alpha=None,
        personalize=None,
        sweep_dir=None,
        top=2,
        budget=None,
        seed=None,
        device=None,
        out=Path("runs/x"),
        no_verify=False,
        top_blocks=None,
        client_store=None,
        checkpoint_every=None,
        data_option=None,
    )
    trained, _ = train.run_config(
        **given, preset_name="paper-cifar100", method="perfedavg", option=None, knobs={"lr": 0.05}
    )
    assert trained.lr == 0.05  # the preset's Per-FedAvg lr 0.001 yields to --lr
    perfixed, _ = train.run_config(
        **given, preset_name="paper-cifar100", method="fedperfix", option=["local=blocks.1"], knobs={}
    )
    assert perfixed.method_options["local"] == "blocks.1"
    swept = sweep.build_config("paper-cifar100", run={"lr": 0.05, "rounds": 3}, sweep={"seeds": (4,)})
    assert (swept.run.lr, swept.run.rounds, swept.seeds) == (0.05, 3, (4,))
    compared = compare.build_config(
        "paper-cifar100",
        run={"lr": 0.05},
        compare={"methods": ("perfedavg", "fedperfix")},
        options={"local": "blocks.1"},
    )
    assert run_config(compared, "perfedavg", 1).lr == 0.05
    assert run_config(compared, "fedperfix", 1).method_options["local"] == "blocks.1"
    untouched = compare.build_config("paper-cifar100", run={}, compare={"methods": ("perfedavg", "fedperfix")})
    assert run_config(untouched, "perfedavg", 1).lr == 0.001  # without the option the preset's value stays
    assert run_config(untouched, "fedperfix", 1).method_options["local"] == "blocks.11"


def test_a_preset_setting_that_does_not_fit_the_model_is_named_with_its_override(tmp_path):
    args = ["compare", "--preset", "paper-cifar100", "--dataset", "synthetic", "--model", "vit-nano"]
    args += ["--clients", "4", "--min-samples", "1", "--methods", "fedperfix", "--out", str(tmp_path), "--quiet"]
    line = _one_line_error(CliRunner().invoke(app, args), "blocks.11")
    assert "paper-cifar100 preset" in line and "-o local=" in line


# ---- executors -------------------------------------------------------------------------------------------


def test_jobs_are_clamped_to_the_cores_and_the_cells_with_a_notice():
    from fedsens.sensitivity.executors import clamp_jobs

    assert clamp_jobs(64, 21, 2) == (2, "--jobs 64: this machine has 2 cores; training 2 at a time")
    assert clamp_jobs(64, 1, 2) == (1, None)  # one cell: one worker, nothing to say
    assert clamp_jobs(2, 21, 16) == (2, None)


def test_a_ray_address_where_nothing_listens_is_one_line_within_seconds_before_any_cell(tmp_path):
    started = time.monotonic()
    args = ["sweep", *TINY, "--rounds", "1", "--seeds", "0", "--executor", "ray", "--ray-address", "127.0.0.1:1"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "sweep")])
    _one_line_error(result, "--ray-address 127.0.0.1:1", "nothing answers")
    assert time.monotonic() - started < 60 and not (tmp_path / "sweep" / "cells").exists()


def test_ray_addresses_are_parsed_and_checked():
    from fedsens.sensitivity.ray_executor import check_ray_address, ray_host_port

    assert ray_host_port("ray://127.0.0.1:10001") == ("127.0.0.1", 10001)
    with pytest.raises(UserError, match="not HOST:PORT"):
        ray_host_port("127.0.0.1")
    check_ray_address(None)
    check_ray_address("auto")
    with pytest.raises(UserError, match="nothing answers"):
        check_ray_address("127.0.0.1:1", timeout=1.0)


# ---- flower app -------------------------------------------------------------------------------------------


def test_flower_app_never_overwrites_a_users_module(tmp_path):
    pytest.importorskip("flwr")
    mine = tmp_path / "fedsens_app.py"
    mine.write_text("# my own code\n")
    result = CliRunner().invoke(app, ["flower", "app", str(tmp_path), *TINY[:-1]])  # no --quiet: nothing trains
    _one_line_error(result, "fedsens_app.py exists", "--overwrite")
    assert mine.read_text() == "# my own code\n" and not (tmp_path / "pyproject.toml").exists()
