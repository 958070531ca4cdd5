"""`benchmarks/gpu_check.sh --smoke`: the GPU check's own code on the CPU with tiny settings, so it cannot rot."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
PARTS = ("tests", "throughput", "paper-round", "sweep")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[pd.DataFrame, str]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (out / "gpu_check.md").read_text().startswith("| part | name | value | unit | goal | result |")
    return pd.read_csv(out / "gpu_check.csv"), done.stdout


def test_every_part_wrote_its_rows_and_none_failed_to_run(smoke):
    table, output = smoke
    assert list(table.columns) == ["part", "name", "value", "unit", "goal", "result"]
    assert set(PARTS) <= set(table["part"])
    assert not table["name"].str.contains("failed|cut at its time limit|skipped, missing").any(), table.to_string()
    assert "gpu_check.md" in output
    for part in PARTS:
        assert f"gpu_check: {part}:" in output


def test_the_measures_are_finite_numbers(smoke):
    table, _ = smoke
    measured = table[table["unit"].notna() & (table["part"] != "tests")]
    assert len(measured) >= 12
    for row in measured.itertuples():
        assert math.isfinite(float(row.value)) and float(row.value) >= 0, row


def test_each_part_measures_what_it_says(smoke):
    table, _ = smoke
    names = " / ".join(table["name"])
    assert "engine / plain step" in names and "engine model FLOPs utilisation" in names
    assert "measured fp32 matmul peak" in names  # the smoke runs on the CPU: fp32
    assert "paper-cifar100 round 1" in names and "50 rounds projected" in names
    assert "cells packed on the CPU" in names and "one cell at a time" in names
    sweep = table[table["name"].str.contains("largest difference")]
    assert float(sweep["value"].iloc[0]) == 0.0  # the same cells, wherever they ran
    tests = table[table["part"] == "tests"]
    assert len(tests) and set(tests["value"]) <= {"passed", "skipped"}  # skipped without CUDA


def test_the_carried_wheels_install_without_an_index(tmp_path):
    folder = REPO / "benchmarks" / "wheels"
    wheels = list(folder.glob("*.whl"))
    assert all(w.name.endswith("-none-any.whl") for w in wheels)  # pure Python: any interpreter, any machine
    assert sum(w.stat().st_size for w in wheels) < 15 * 2**20
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(folder),
         "--target", str(tmp_path / "site"), "--ignore-installed", "typer", "pytest", "tqdm"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    for package in ("typer", "click", "rich", "pytest", "pluggy", "tqdm"):
        assert (tmp_path / "site" / package).is_dir()
