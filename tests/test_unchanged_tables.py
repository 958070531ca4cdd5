"""`fedsens train` writes the same tables, bit for bit (but the timing column), as the starting commit 7c344f0.

The stored copies under tests/data/baseline-7c344f0 were written by that commit's `fedsens train` with the
arguments below (on CPU, one torch thread); `default/rounds.csv` is the default run's (40 rounds, minutes
on a loaded CPU, so it is compared by hand: `fedsens train --device cpu --out X`, then this module's
`same_table`).

Bit for bit holds on one machine only: another CPU takes other kernel paths (vector width, oneDNN's choice
of matmul), and 7c344f0 itself then writes other last bits. So a machine whose float path differs from the
first one's keeps its own copies, written by 7c344f0 on that machine, in `cpu-<fingerprint>/`: the
fingerprint hashes one seeded training step of a tiny ViT (`float_fingerprint`). To add a machine, check out
7c344f0 in a worktree (with fedsens/personalize, sensitivity and reports linked to the top-level folders),
run the arguments below there with `--device cpu` at one thread, and copy each run's rounds.csv and
metrics.csv into `cpu-<fingerprint>/<run>/`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fedsens.cli import app
from fedsens.personalize import model as model_lib

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


def float_fingerprint() -> str:
    """12 hex digits of the bytes one seeded AdamW step of vit-nano leaves: equal on machines whose CPU
    kernels compute the same last bits (the tests run at one thread: conftest)."""
    net = model_lib.build("vit-nano", 10, 1, 16, seed=0)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 16, 16, generator=generator), torch.arange(8) % 10
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    F.cross_entropy(net(x), y).backward()
    optimizer.step()
    digest = hashlib.sha256()
    for tensor in net.state_dict().values():
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def baseline_of_this_machine() -> Path:
    """This machine's copies when its float path has its own, else the first machine's."""
    own = BASELINE / f"cpu-{float_fingerprint()}"
    return own if own.is_dir() else BASELINE


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
    baseline = baseline_of_this_machine()
    for table in ("rounds.csv", "metrics.csv"):
        try:
            same_table(out / table, baseline / name / table)
        except AssertionError as error:
            if baseline == BASELINE:  # no copies for this machine: the module docstring says how to add them
                raise AssertionError(f"{error}\n(float fingerprint cpu-{float_fingerprint()} has no copies)") from error
            raise
