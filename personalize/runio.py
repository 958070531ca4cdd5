"""A run folder on disk: config.json, the CSV tables, summary.json and the per-round checkpoint.

Every write goes to a temporary file first and is then renamed, so a run killed mid-write leaves
the previous complete file behind, never half a table.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
import platform
import re
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fedsens.personalize.errors import CorruptFileError, UserError
from fedsens.personalize.schema import BOOLEAN_COLUMNS, CHOICE_COLUMNS, NUMERIC_COLUMNS, RUN_TABLE_COLUMNS
from fedsens.personalize.schema import EVAL_PROTOCOLS as EVAL_PROTOCOLS

# The column order of the engine's tables, declared in schema.py (kept here under its old name).
TABLE_COLUMNS = RUN_TABLE_COLUMNS


def with_path(err: OSError, path: Path | str) -> OSError:
    """`err` naming `path` when the OS left its file name out (a full disk seen at flush or close, an error
    raised from inside a library's writer): every OSError fedsens reports names the file it was writing."""
    if err.filename is None:
        err.filename = str(path)
    return err


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Any OSError inside the block names `path` (see `with_path`)."""
    try:
        yield
    except OSError as err:
        raise with_path(err, path) from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then rename it over `path`: a reader (or
    a run killed mid-write, or a machine that loses power) sees the old file or the new one, never half of
    one. On any failure the temporary is removed and an OSError names `path`. The temporary name carries the
    process id, so two processes writing the same file do not write into each other's scratch file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with writing(path):
            write(tmp)
            _fsync(tmp)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """`path` holds `text` (UTF-8), written atomically."""
    replace_atomically(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    """`path` holds `data`, written atomically."""
    replace_atomically(Path(path), lambda tmp: tmp.write_bytes(data))


def slug(text: str) -> str:
    """`text` as one safe file or folder name: a cell's part spec, a figure's partition label."""
    return re.sub(r"[^A-Za-z0-9._@+=-]", "_", text.replace(",", "+").replace(" ", ""))


def write_json(path: Path, data: Any) -> None:
    write_text(Path(path), json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path, fix: str = "delete it and re-run the command that wrote it") -> Any:
    """A JSON file fedsens wrote; a truncated or garbled one is a CorruptFileError naming it and `fix`."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise CorruptFileError(path, f"not valid JSON: {err}", fix) from None


def write_table(path: Path, rows: list[dict], columns: list[str] | None = None) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=columns) if columns else pd.DataFrame(rows)
    replace_atomically(Path(path), lambda tmp: frame.to_csv(tmp, index=False))
    return frame


def read_table(
    path: Path,
    fix: str,
    *,
    kind: str | None = None,
    required: Sequence[str] | None = None,
    allow_cut_short: bool = False,
) -> pd.DataFrame:
    """A CSV table fedsens wrote, validated before it is used: UTF-8 text, every row as many fields as the
    header, the `required` columns (default: the table's declared ones, schema.RUN_TABLE_COLUMNS, by `kind`,
    default the file's stem) present, and its numeric, boolean and choice columns holding such values.
    Anything else is one CorruptFileError naming the file, the line and `fix`. An empty file is an empty
    table (with the declared columns). `allow_cut_short`: a last line without its newline (a copy or write
    cut short) is dropped.
    """
    path = Path(path)
    kind = kind or path.stem
    declared = TABLE_COLUMNS.get(kind)
    with writing(path):
        data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise CorruptFileError(path, f"not UTF-8 text: byte {err.start} on line {line}", fix) from None
    if allow_cut_short and text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return pd.DataFrame(columns=declared)
    header = rows[0]
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise CorruptFileError(path, f"line {number} has {len(row)} fields, the header {len(header)}", fix)
    absent = [c for c in (declared or () if required is None else required) if c not in header]
    if absent:
        raise CorruptFileError(path, f"no column {', '.join(absent)}", fix)
    frame = pd.read_csv(io.StringIO(text))
    for column in NUMERIC_COLUMNS.get(kind, ()):
        if column in frame and frame[column].dtype == object:
            numbers = pd.to_numeric(frame[column], errors="coerce")
            bad = numbers.isna() & frame[column].notna()
            raise_bad(path, column, frame[column], bad, "a number", fix)
            frame[column] = numbers
    for column in BOOLEAN_COLUMNS.get(kind, ()):
        if column in frame and frame[column].dtype != bool:
            bad = frame[column].notna() & ~frame[column].astype(str).isin(("True", "False"))
            raise_bad(path, column, frame[column], bad, "True or False", fix)
    for column, choices in CHOICE_COLUMNS.get(kind, {}).items():
        if column in frame:
            bad = frame[column].notna() & ~frame[column].isin(choices)
            raise_bad(path, column, frame[column], bad, f"one of {', '.join(choices)}", fix)
    return frame


def check_resumed_tables(out: Path, sizes: dict[str, int], round_: int, fix: str) -> None:
    """A run resuming from the checkpoint of `round_` finds each table as the checkpoint recorded it: as
    many bytes (after rows written later were cut off: fewer means rows were lost, a deleted or cut table),
    readable and well-formed, and rounds.csv holding exactly rounds 1..round_. Anything else is one
    CorruptFileError: a run that went on would report a history it does not have."""
    for name, size in sizes.items():
        path = Path(out) / f"{name}.csv"
        actual = path.stat().st_size if path.exists() else None
        if actual != size:
            what = "is missing" if actual is None else f"holds {actual} bytes"
            raise UserError(
                f"{path} {what}, but the checkpoint of round {round_} records {size} bytes of it "
                f"(rows were lost); {fix}"
            )
        table = read_table(path, fix)
        if name == "rounds" and list(table["round"]) != list(range(1, round_ + 1)):
            raise CorruptFileError(path, f"its rounds are not 1..{round_}, the checkpoint's", fix)


def raise_bad(path: Path, column: str, values: pd.Series, bad: pd.Series, wanted: str, fix: str) -> None:
    """A CorruptFileError naming the first row where `bad` holds (its line number in the file)."""
    if bad.any():
        first = int(bad.to_numpy().nonzero()[0][0])
        raise CorruptFileError(path, f"line {first + 2}: {column} {values.iloc[first]!r} is not {wanted}", fix)


def append_rows(path: Path, rows: list[dict], columns: list[str]) -> int:
    """Append rows to a CSV (its header first when the file is new); returns the file's size after.

    A run's tables grow by one round's rows each round instead of being rewritten whole, so the cost
    of a round does not grow with the round number.
    """
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    if rows or new:
        frame = pd.DataFrame(rows, columns=columns)
        # Not atomic (a table grows in place), but a resumed run cuts it back to the checkpoint's size first.
        with writing(path), open(path, "a", newline="", encoding="utf-8") as handle:
            frame.to_csv(handle, index=False, header=new)
    return path.stat().st_size


def truncate(path: Path, size: int) -> None:
    """Cut a table back to `size` bytes (what it held at the checkpoint a run resumes from)."""
    path = Path(path)
    if path.exists() and path.stat().st_size > size:
        with writing(path), open(path, "r+b") as handle:
            handle.truncate(size)


class _HashingWriter:
    """A file wrapper that hashes what torch.save writes, so the checkpoint is never read twice to hash it."""

    def __init__(self, handle):
        self.handle, self.digest = handle, hashlib.sha256()
        self.error: OSError | None = None  # torch turns a failed write into a RuntimeError; the cause is kept

    def write(self, data) -> int:
        self.digest.update(data)
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.handle.flush()


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def previous_checkpoint(path: Path) -> Path:
    """Where the checkpoint before the latest one is kept (checkpoint.pt -> checkpoint.prev.pt)."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def checkpoint_files(path: Path) -> tuple[Path, ...]:
    """Every file a checkpoint at `path` may leave: the latest, the previous one and their digests."""
    path = Path(path)
    previous = previous_checkpoint(path)
    return path, _digest_path(path), previous, _digest_path(previous)


def has_checkpoint(path: Path) -> bool:
    """A run saved a checkpoint here: the latest, or only the previous one (a save killed while it moved the
    latest aside leaves that alone)."""
    return Path(path).exists() or previous_checkpoint(Path(path)).exists()


def save_checkpoint(path: Path, state: dict) -> None:
    """Write the checkpoint atomically with its SHA-256 beside it, keeping the previous good one.

    Order matters for a kill at any moment: the new file is complete (and hashed) before the old pair is
    moved aside, and its digest lands before the file itself, so the name `path` never holds a file without
    a digest: a killed first save leaves no checkpoint (the run starts over), a later one leaves a file that
    matches one of the two recorded digests (`load_checkpoint` accepts either).
    """
    import torch  # here, not at the top: the partition and dataset writers use this module without torch

    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with writing(path):
            with open(tmp, "wb") as handle:
                writer = _HashingWriter(handle)
                try:
                    torch.save(state, writer)  # type: ignore[arg-type]  # torch only calls write() and flush()
                except RuntimeError:
                    if writer.error is None:
                        raise
                    raise writer.error from None  # the disk's own error (no space left ...), not torch's wrapper
                handle.flush()
                os.fsync(handle.fileno())
            previous = previous_checkpoint(path)
            if path.exists() and _digest_path(path).exists():
                os.replace(path, previous)
                os.replace(_digest_path(path), _digest_path(previous))
            write_text(_digest_path(path), writer.digest.hexdigest() + "\n")
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _recorded_digests(path: Path) -> set[str]:
    """The digests recorded beside the latest and the previous checkpoint (a file matching either is whole)."""
    recorded = set()
    for digest_file in (_digest_path(path), _digest_path(previous_checkpoint(path))):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            recorded.add(digest_file.read_text().strip())
    return recorded


def _verified_load(candidate: Path, recorded: set[str]) -> dict:
    """Load a checkpoint whose content matches a recorded SHA-256; ValueError says what is wrong."""
    if not candidate.exists():
        raise ValueError("missing")
    if not recorded:
        raise ValueError("no recorded checksum")
    digest = hashlib.sha256()
    with open(candidate, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() not in recorded:
        raise ValueError("checksum mismatch: truncated or overwritten")
    import torch

    try:
        # weights_only: the checkpoint holds only tensors and plain containers, so nothing runs on load.
        return torch.load(candidate, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise ValueError(f"unreadable: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def load_checkpoint(path: Path, notify=None) -> dict:
    """The latest good checkpoint: the newest whose checksum matches, else the previous one (`notify` is told).

    If neither is good the run cannot be resumed: a CorruptFileError says to start over with --overwrite.
    """
    path = Path(path)
    recorded = _recorded_digests(path)
    try:
        return _verified_load(path, recorded)
    except ValueError as latest_problem:
        previous = previous_checkpoint(path)
        try:
            state = _verified_load(previous, recorded)
        except ValueError:
            raise CorruptFileError(
                path, str(latest_problem), "no earlier good checkpoint is left: start over with --overwrite"
            ) from None
        if notify is not None:
            what = "is missing (a save was cut short)" if not path.exists() else f"is damaged ({latest_problem})"
            notify(f"{path} {what}; resuming from the previous checkpoint ({previous.name})")
        return state


def settings_record(config: Any) -> dict[str, str]:
    """What a checkpoint keeps of the run's settings (a RunConfig), as JSON text: a resumed run compares its
    options with these, not with config.json, which a person can edit or damage."""
    return {"settings": json.dumps(dataclasses.asdict(config), default=str)}


def saved_settings(state: dict, config_json: Path) -> dict:
    """The settings a checkpoint's run was trained with: its own record, or config.json for a checkpoint
    written before it kept one."""
    if "settings" in state:
        return json.loads(state["settings"])
    return read_json(config_json, "the checkpoint predates fedsens keeping its settings: start over with --overwrite")[
        "config"
    ]


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
