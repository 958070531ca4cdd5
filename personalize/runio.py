"""A run folder on disk: config.json, the CSV tables, summary.json and the per-round checkpoint.

Every write goes to a temporary file first and is then renamed, so a run killed mid-write leaves
the previous complete file behind, never half a table.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from fedsens.personalize.errors import CorruptFileError
from fedsens.personalize.schema import EVAL_PROTOCOLS as EVAL_PROTOCOLS
from fedsens.personalize.schema import RUN_TABLE_COLUMNS

# The column order of the engine's tables, declared in schema.py (kept here under its old name).
TABLE_COLUMNS = RUN_TABLE_COLUMNS


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`: a reader (or a run
    killed mid-write) sees the old file or the new one, never half of one. The temporary name carries the
    process id, so two processes writing the same file do not write into each other's scratch file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def slug(text: str) -> str:
    """`text` as one safe file or folder name: a cell's part spec, a figure's partition label."""
    return re.sub(r"[^A-Za-z0-9._@+=-]", "_", text.replace(",", "+").replace(" ", ""))


def write_json(path: Path, data: Any) -> None:
    replace_atomically(Path(path), lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))


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
    replace_atomically(Path(path), lambda tmp: frame.to_csv(tmp, index=False))
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
    import torch  # here, not at the top: the partition and dataset writers use this module without torch

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
    replace_atomically(_digest_path(path), lambda t: t.write_text(writer.digest.hexdigest() + "\n"))


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
    import torch

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
            notify(f"{path} is damaged ({latest_problem}); resuming from the previous checkpoint ({previous.name})")
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
    import torch
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
