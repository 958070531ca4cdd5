"""Hundreds of generated bad command lines: each ends in one clear line and exit 2, never a traceback.

Every generated invocation carries exactly one bad value (from the table below) among valid, cheap options,
so it must fail before any real training; the message must name the offending option or path.
"""

import random
from collections import Counter
from pathlib import Path

from typer.testing import CliRunner

from fedsens.cli import app

CHEAP = {"--dataset": "synthetic", "--model": "vit-nano", "--clients": "4", "--rounds": "1"}
CHEAP_SPLIT = {"--dataset": "synthetic", "--clients": "4"}

# option -> bad values; the message must mention the option's name (without dashes) or the value.
BAD_RUN_OPTIONS = {
    "--rounds": ["0", "-3", "many", "1.5"],
    "--clients": ["0", "-1", "x", "100000"],
    "--alpha": ["0", "-0.5", "nan?", "abc"],
    "--join-ratio": ["0", "1.5", "-1", "half"],
    "--lr": ["0", "-0.1", "fast"],
    "--local-epochs": ["0", "-2", "e"],
    "--batch-size": ["0", "-8", "big"],
    "--optimizer": ["adam", "SGDX", ""],
    "--model": ["vit-huge", "resnet50", ""],
    "--dataset": ["imagenet", "cifar10", ""],
    "--partition": ["random", "dirichlet2", ""],
    "--seed": ["s0", "1.5"],
    "--eval-every": ["0", "-1", "x"],
    "--device": ["cuda:7", "tpu", "gpu0"],
}
BAD_TRAIN_ONLY = {
    "--personalize": ["heads", "attn@9-11", "attn@3-1", "blocks.99", "none,head", "mlp@x"],
    "--method": ["fedprox", "FedAvg", ""],
}
BAD_GRID_OPTIONS = {
    "--seeds": ["a,b", "0,x", "1.5"],
    "--alphas": ["-1", "0", "x"],
    "--preset": ["slow", "paper-imagenet", ""],
}
BAD_SWEEP_ONLY = {"--div-every": ["0", "-1", "x"], "--parts": ["heads", "attn@99"]}
BAD_COMPARE_ONLY = {"--methods": ["fedprox", "fedavg,nope", ""]}
BAD_SPLIT = {
    "--clients": ["0", "x", "100000"],
    "--alpha": ["0", "-1", "x"],
    "--scheme": ["random", ""],
    "--test-fraction": ["0", "1", "1.5", "x"],
    "--dataset": ["imagenet", ""],
}


def _generate(rng: random.Random, tmp: Path) -> list[tuple[list[str], str, str]]:
    """(argv, offending option, bad value) triples, a fixed number per command."""
    plans = [
        (["train"], {**BAD_RUN_OPTIONS, **BAD_TRAIN_ONLY}, CHEAP, 90),
        (["sweep"], {**BAD_RUN_OPTIONS, **BAD_GRID_OPTIONS, **BAD_SWEEP_ONLY}, CHEAP, 60),
        (["compare"], {**BAD_RUN_OPTIONS, **BAD_GRID_OPTIONS, **BAD_COMPARE_ONLY}, CHEAP, 50),
        (["data", "split"], BAD_SPLIT, CHEAP_SPLIT, 40),
    ]
    cases = []
    for command, table, cheap, count in plans:
        for i in range(count):
            option = rng.choice(sorted(table))
            value = rng.choice(table[option])
            good = [key for key in cheap if key != option]
            rng.shuffle(good)  # options in any order
            argv = [*command, *(x for key in good for x in (key, cheap[key])), option, value]
            argv += ["--out", str(tmp / f"{command[-1]}-{i}"), "--quiet"]
            cases.append((argv, option, value))
    return cases


def _counts(outcome: Counter) -> dict[str, int]:
    """The harness's report: tried / clear / traceback / silent (accepted, or a line that names nothing) / lost."""
    return {"tried": sum(outcome.values()), **{k: outcome[k] for k in ("clear", "traceback", "silent", "lost")}}


def _traceback(result) -> bool:
    return "Traceback" in result.output or (
        result.exception is not None and not isinstance(result.exception, SystemExit)
    )


def test_generated_bad_command_lines_fail_cleanly(tmp_path):
    runner = CliRunner()
    outcome: Counter = Counter()
    failures = []
    for argv, option, value in _generate(random.Random(12), tmp_path):
        result = runner.invoke(app, argv)
        text = result.output
        named = option.lstrip("-") in text or option.lstrip("-").replace("-", "_") in text or (value and value in text)
        if _traceback(result):
            outcome["traceback"] += 1
            failures.append((argv, "traceback", text[-400:] or repr(result.exception)))
        elif result.exit_code == 0:
            outcome["silent"] += 1
            failures.append((argv, "accepted", text[-200:]))
        elif result.exit_code != 2:
            outcome["silent"] += 1
            failures.append((argv, f"exit {result.exit_code}", text[-200:]))
        elif not named:
            outcome["silent"] += 1
            failures.append((argv, "message does not name the option or value", text[-300:]))
        else:
            outcome["clear"] += 1
    print("bad command lines:", _counts(outcome))
    assert not failures, "\n".join(f"{' '.join(a)}\n  -> {why}: {out}" for a, why, out in failures[:15])


# ---- damaged tables and full disks: each ends in one clear line, or in the tables of an undamaged run ----------

TINY = ["--dataset", "synthetic", "--model", "vit-nano", "--clients", "4", "--quiet"]
RUN_FILES = ("metrics.csv", "rounds.csv", "config.json", "summary.json", "checkpoint.pt", "partition.json")


def _garble(data: bytes, rng: random.Random, alphabet: bytes) -> bytes:
    """16 bytes from `alphabet` over a middle row (past the header)."""
    start = data.index(b"\n") + 1
    at = rng.randrange(start, max(start + 1, len(data) - 40))
    garbage = bytes(rng.choice(alphabet) for _ in range(16))
    return data[:at] + garbage + data[at + 16 :]


def _drop_middle_line(data: bytes) -> bytes:
    lines = data.split(b"\n")
    return b"\n".join(lines[: len(lines) // 2] + lines[len(lines) // 2 + 1 :])


DAMAGES = {
    "non-utf8": lambda data, rng: _garble(data, rng, bytes(range(0x80, 0x100))),
    "ascii-garbage": lambda data, rng: _garble(data, rng, b"abcdefghijklmnopqrstuvwxyz!#%&"),
    "half": lambda data, rng: data[: len(data) // 2],
    "empty": lambda data, rng: b"",
    "middle-line-dropped": lambda data, rng: _drop_middle_line(data),
    "header-renamed": lambda data, rng: data.replace(b"round", b"rownd", 1),
    "deleted": None,
}
DAMAGED = {"metrics.csv": list(DAMAGES), "rounds.csv": list(DAMAGES), "config.json": ["ascii-garbage", "deleted"]}


def _snapshot(folder: Path, skip: str) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in RUN_FILES if name != skip and (folder / name).exists()}


def test_damaged_tables_end_in_one_line_or_in_the_undamaged_runs_tables(tmp_path):
    import shutil

    import pandas as pd

    runner = CliRunner()
    whole, base = tmp_path / "whole", tmp_path / "base"
    assert runner.invoke(app, ["train", *TINY, "--rounds", "3", "--out", str(whole)]).exit_code == 0
    assert runner.invoke(app, ["train", *TINY, "--rounds", "2", "--out", str(base)]).exit_code == 0
    expected = {
        n: pd.read_csv(whole / n).drop(columns=["seconds"], errors="ignore") for n in ("rounds.csv", "metrics.csv")
    }
    rng = random.Random(27)
    outcome: Counter = Counter()
    failures = []
    for name, damages in DAMAGED.items():
        for damage in damages:
            folder = tmp_path / f"{name}-{damage}"
            shutil.copytree(base, folder)
            target = folder / name
            if DAMAGES[damage] is None:
                target.unlink()
            else:
                target.write_bytes(DAMAGES[damage](target.read_bytes(), rng))
            before = _snapshot(folder, name)
            result = runner.invoke(app, ["train", *TINY, "--rounds", "3", "--out", str(folder), "--resume"])
            errors = [line for line in result.output.splitlines() if line.startswith("error:")]
            case = f"{name} {damage}"
            if _traceback(result):
                outcome["traceback"] += 1
                failures.append((case, "traceback", result.output[-400:] or repr(result.exception)))
            elif result.exit_code == 2 and len(errors) == 1 and name in errors[0]:
                lost = [
                    n for n, data in before.items() if not (folder / n).exists() or (folder / n).read_bytes() != data
                ]
                outcome["lost" if lost else "clear"] += 1
                if lost:
                    failures.append((case, f"refused but changed {lost}", errors[0]))
            elif result.exit_code == 0:
                same = all(
                    pd.read_csv(folder / n).drop(columns=["seconds"], errors="ignore").equals(table)
                    for n, table in expected.items()
                )
                outcome["clear" if same else "silent"] += 1
                if not same:
                    failures.append((case, "resumed into other tables", result.output[-300:]))
            else:
                outcome["silent"] += 1
                failures.append((case, f"exit {result.exit_code} without one line naming {name}", result.output[-300:]))
    print("damaged tables:", _counts(outcome))
    assert not failures, "\n".join(f"{case}\n  -> {why}: {out}" for case, why, out in failures)


def _complete(command: str, out: Path) -> bool:
    """What a command that exited 0 must have left whole."""
    if command == "report":
        return (out / "report" / "index.html").read_text().rstrip().endswith("</html>")
    table = {"train": "rounds.csv", "sweep": "sensitivity.csv", "compare": "comparison.csv"}[command]
    return (out / table).is_file() and (out / table).read_bytes().endswith(b"\n")


def test_full_disks_end_in_one_line_without_temporaries(tmp_path):
    """train, report, sweep and compare on a nearly full tmpfs, at several amounts of room left."""
    import os
    import subprocess

    import pytest

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    runner = CliRunner()
    outcome: Counter = Counter()
    failures = []
    try:
        done = disk / "done"
        assert runner.invoke(app, ["train", *TINY, "--rounds", "1", "--out", str(done)]).exit_code == 0
        for name in ("checkpoint.pt", "checkpoint.prev.pt"):
            (done / name).unlink(missing_ok=True)
        commands = {
            "train": ["train", *TINY, "--rounds", "3"],
            "sweep": ["sweep", *TINY, "--rounds", "1", "--seeds", "0", "--only-parts", "--parts", "head", "--force"],
            "compare": ["compare", *TINY, "--rounds", "1", "--methods", "fedavg,fedper", "--force"],
            "report": ["report", "--quiet"],
        }
        for i, leave in enumerate((1_000, 60_000, 300_000)):
            for command, argv in commands.items():
                out = done if command == "report" else disk / f"{command}-{i}"
                stats = os.statvfs(disk)
                filler = disk / "filler"
                filler.write_bytes(b"\0" * max(0, stats.f_bavail * stats.f_frsize - leave))
                result = runner.invoke(app, [*argv, str(out)] if command == "report" else [*argv, "--out", str(out)])
                filler.unlink()
                strays = [p.name for p in disk.rglob("*.tmp")]
                errors = [line for line in result.output.splitlines() if line.startswith("error:")]
                case = f"{command} with {leave} bytes left"
                if _traceback(result):
                    outcome["traceback"] += 1
                    failures.append((case, "traceback", result.output[-400:] or repr(result.exception)))
                elif strays:
                    outcome["lost"] += 1
                    failures.append((case, f"left {strays}", result.output[-200:]))
                elif result.exit_code == 2 and len(errors) == 1 and "no space left" in errors[0]:
                    outcome["clear"] += 1
                elif result.exit_code == 0 and _complete(command, out):  # room enough: it finished, whole
                    outcome["clear"] += 1
                else:
                    outcome["silent"] += 1
                    failures.append((case, f"exit {result.exit_code}", result.output[-300:]))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    print("full disks:", _counts(outcome))
    assert not failures, "\n".join(f"{case}\n  -> {why}: {out}" for case, why, out in failures)
