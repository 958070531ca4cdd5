"""`fedsens train` writes the same tables, bit for bit (but the timing column), as the starting commit 7c344f0.

The stored copies under tests/data/baseline-7c344f0 were written by that commit's `fedsens train` with the
arguments below (on CPU, one torch thread); `default/rounds.csv` is the default run's (40 rounds, minutes
on a loaded CPU, so it is compared by hand: `fedsens train --device cpu --out X`, then this module's
`same_table`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedsens.cli import app

BASELINE = Path(__file__).parent / "data" / "baseline-7c344f0"
SYNTHETIC = "--dataset synthetic --model vit-nano "
RUNS = {
    "tiny_default": "--rounds 3 --clients 6".split(),
    "syn_fedperfix": (SYNTHETIC + "--rounds 2 --clients 4 --method fedperfix --local-steps 2").split(),
    "syn_population": (
        # 7c344f0 spelled the population --synthetic-per-client 12 --synthetic-size 8 --synthetic-classes 4
        SYNTHETIC + "--rounds 2 --clients 8 -d num_samples=96 -d image_size=8 --data-option num_classes=4 "
        "--scheme iid --local-steps 2 --personalize attn@0-0,head"
    ).split(),
    "flower_fedper": (SYNTHETIC + "--rounds 2 --clients 4 --method fedper --local-steps 1 --engine flower").split(),
}


def same_table(written: Path, stored: Path) -> None:
    """The two CSV files hold the same bytes in every column but `seconds`."""
    new, old = pd.read_csv(written, dtype=str), pd.read_csv(stored, dtype=str)
    assert list(new.columns) == list(old.columns)
    kept = [c for c in old.columns if c != "seconds"]
    pd.testing.assert_frame_equal(new[kept], old[kept])


@pytest.mark.parametrize("name", RUNS)
def test_train_writes_the_tables_of_the_starting_commit(tmp_path, name):
    if "flower" in RUNS[name]:
        pytest.importorskip("flwr")
    out = tmp_path / name
    args = ["train", *RUNS[name], "--device", "cpu", "--quiet", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for table in ("rounds.csv", "metrics.csv"):
        same_table(out / table, BASELINE / name / table)
