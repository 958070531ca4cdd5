"""Ctrl-C (and SIGTERM) that cannot be lost.

Python raises KeyboardInterrupt wherever the main thread happens to be; when that is inside a finalizer (a
progress bar's or a tensor's `__del__`, a weakref callback), the exception is printed as "ignored" and
the command goes on: a sweep or comparison then trains every queued run. So the handler also records the
request, and the loops that start runs and rounds call `check()`, which raises it again there.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_requested = threading.Event()  # process-wide, as signals are


def _request(signum, frame) -> None:
    _requested.set()
    raise KeyboardInterrupt


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C or SIGTERM arrived while `handled()` was active, even if the first
    KeyboardInterrupt was swallowed on its way."""
    if _requested.is_set():
        raise KeyboardInterrupt("interrupted (Ctrl-C or SIGTERM)")


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt and are remembered for `check()`, for the block's duration
    (the main thread only: signal handlers can be set there alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested.clear()
    previous = {sig: signal.signal(sig, _request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _requested.clear()
