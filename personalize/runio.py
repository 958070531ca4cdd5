"""A run folder on disk: config.json, the CSV tables, summary.json and the per-round checkpoint.

Every write goes to a temporary file first and is then renamed, so a run killed mid-write leaves
the previous complete file behind, never half a table.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from fedsens.personalize.errors import CorruptFileError

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
    """A JSON file fedsens wrote; a truncated or garbled one is a CorruptFileError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise CorruptFileError(
            path, f"not valid JSON: {err}", "delete it and re-run the command that wrote it"
        ) from None


def write_table(path: Path, rows: list[dict], columns: list[str] | None = None) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=columns) if columns else pd.DataFrame(rows)
    _replace_atomically(Path(path), lambda tmp: frame.to_csv(tmp, index=False))
    return frame


class _HashingWriter:
    """A file wrapper that hashes what torch.save writes, so the checkpoint is never read twice to hash it."""

    def __init__(self, handle):
        self.handle, self.digest = handle, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def previous_checkpoint(path: Path) -> Path:
    """Where the checkpoint before the latest one is kept (checkpoint.pt -> checkpoint.prev.pt)."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: Path, state: dict) -> None:
    """Write the checkpoint atomically with its SHA-256 beside it, keeping the previous good one.

    Order matters for a kill at any moment: the new file is complete (and hashed) before the old pair is
    moved aside, and the new digest is written last, so there is always one checkpoint whose digest matches.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        writer = _HashingWriter(handle)
        torch.save(state, writer)  # type: ignore[arg-type]  # torch only calls write() and flush()
    previous = previous_checkpoint(path)
    if path.exists() and _digest_path(path).exists():
        os.replace(path, previous)
        os.replace(_digest_path(path), _digest_path(previous))
    os.replace(tmp, path)
    _replace_atomically(_digest_path(path), lambda t: t.write_text(writer.digest.hexdigest() + "\n"))


def _verified_load(path: Path) -> dict:
    """Load a checkpoint whose content matches its recorded SHA-256; ValueError says what is wrong."""
    digest_file = _digest_path(path)
    if not path.exists():
        raise ValueError("missing")
    if not digest_file.exists():
        raise ValueError("no recorded checksum (killed while being written)")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != digest_file.read_text().strip():
        raise ValueError("checksum mismatch: truncated or overwritten")
    try:
        # weights_only: the checkpoint holds only tensors and plain containers, so nothing runs on load.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise ValueError(f"unreadable: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def load_checkpoint(path: Path, notify=None) -> dict:
    """The latest good checkpoint: the newest whose checksum matches, else the previous one (`notify` is told).

    If neither is good the run cannot be resumed: a CorruptFileError says to start over with --overwrite.
    """
    path = Path(path)
    try:
        return _verified_load(path)
    except ValueError as latest_problem:
        previous = previous_checkpoint(path)
        try:
            state = _verified_load(previous)
        except ValueError:
            raise CorruptFileError(
                path, str(latest_problem), "no earlier good checkpoint is left: start over with --overwrite"
            ) from None
        if notify is not None:
            notify(f"{path} is {latest_problem}; resuming from the previous checkpoint ({previous.name})")
        return state


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
