"""A run folder on disk: config.json, the CSV tables, summary.json and the per-round checkpoint.

Every write goes to a temporary file first and is then renamed, so a run killed mid-write leaves
the previous complete file behind, never half a table.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import torch

# The column order of the engine's tables (DESIGN.md "Tables"): readers depend on these names.
TABLE_COLUMNS = {
    "metrics": ["round", "client", "split", "loss", "accuracy", "n", "participated"],
    "rounds": ["round", "acc_mean", "acc_std", "acc_p10", "acc_min", "jain", "up_bytes", "down_bytes", "seconds"],
    "divergence": ["round", "group", "part", "block", "metric", "value"],
}


def _replace_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    _replace_atomically(Path(path), lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_table(path: Path, rows: list[dict], columns: list[str] | None = None) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=columns) if columns else pd.DataFrame(rows)
    _replace_atomically(Path(path), lambda tmp: frame.to_csv(tmp, index=False))
    return frame


def append_rows(path: Path, rows: list[dict], columns: list[str]) -> int:
    """Append rows to a CSV (its header first when the file is new); returns the file's size after.

    A run's tables grow by one round's rows each round instead of being rewritten whole, so the cost
    of a round does not grow with the round number.
    """
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    if rows or new:
        frame = pd.DataFrame(rows, columns=columns)
        with open(path, "a", newline="") as handle:
            frame.to_csv(handle, index=False, header=new)
    return path.stat().st_size


def truncate(path: Path, size: int) -> None:
    """Cut a table back to `size` bytes (what it held at the checkpoint a run resumes from)."""
    path = Path(path)
    if path.exists() and path.stat().st_size > size:
        with open(path, "r+b") as handle:
            handle.truncate(size)


def save_checkpoint(path: Path, state: dict) -> None:
    _replace_atomically(Path(path), lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    # weights_only: the checkpoint holds only tensors and plain containers, so nothing runs on load.
    return torch.load(path, map_location="cpu", weights_only=True)


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import timm
    import torchvision

    try:
        fedsens_version = version("fedsens")
    except PackageNotFoundError:  # running from a source tree that was never installed
        fedsens_version = "unknown"
    return {
        "fedsens": fedsens_version,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "pandas": pd.__version__,
    }
