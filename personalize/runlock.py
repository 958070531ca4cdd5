"""One process at a time in a run, sweep or comparison folder.

The lock is an advisory `flock` on `<folder>/.fedsens.lock`, which holds the holder's pid. The kernel drops
the lock when its process dies however it dies (SIGKILL included), so a stale lock never blocks: the next
process takes it over and says whose it was. A second live process gets a clear refusal naming the pid.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedsens.personalize.errors import RunInUse, UserError

LOCK_NAME = ".fedsens.lock"


def _read_holder(handle) -> dict:
    handle.seek(0)
    try:
        return json.loads(handle.read() or "{}")
    except ValueError:
        return {}


def folder(path: str | Path) -> Path:
    """The run, sweep or comparison folder, created if missing; a file in its place is a UserError."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file; pass a folder (it is created if missing)")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def hold(folder: str | Path, *, what: str = "run", notify=None) -> Iterator[dict]:
    """Hold the folder's lock for the duration; yields the previous holder's record ({} if none).

    `notify(line)` is told when a stale lock (its process gone) is taken over.
    """
    path = Path(folder) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - kept open while held: closing it would drop the lock
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(handle)
            who = f"pid {holder.get('pid', '?')}" + (f" on {holder['host']}" if holder.get("host") else "")
            raise RunInUse(
                f"{folder} is in use by another fedsens {holder.get('what', what)} ({who}, started "
                f"{holder.get('started', '?')}); wait for it to finish, stop it, or choose another --out"
            ) from None
        previous = _read_holder(handle)
        if previous.get("pid") and notify is not None:
            notify(f"{folder}: took over the lock left by pid {previous['pid']}, which is no longer running")
        handle.seek(0)
        handle.truncate()
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "what": what,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        handle.write(json.dumps(record))
        handle.flush()
        try:
            yield previous
        finally:
            handle.seek(0)
            handle.truncate()  # an empty lock file: released cleanly, nothing stale to report
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()
