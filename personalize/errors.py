"""The exception types for problems a user can fix, and how an OS error on a user's path is put into words.

Raised with a one-line message that names the bad value or path and the fix; the CLI prints it without
a traceback and exits with status 2.
"""

from __future__ import annotations

import errno
from pathlib import Path


class UserError(ValueError):
    """Bad input (unknown dataset, missing files, bad argument, a part spec that matches nothing)."""


class CorruptFileError(UserError):
    """A file fedsens wrote (or the user supplied) cannot be read back: truncated, garbled, wrong format."""

    def __init__(self, path: str | Path, problem: str, fix: str):
        super().__init__(f"{path} is unreadable ({problem}); {fix}")
        self.path = Path(path)


class RunInUse(UserError):
    """Another live process holds the run, sweep or comparison folder."""


_OS_FIXES = {
    errno.EACCES: "check its permissions or choose another folder (--out)",
    errno.EPERM: "check its permissions or choose another folder (--out)",
    errno.EROFS: "the file system is read-only; choose another folder (--out)",
    errno.ENOSPC: "the disk is full; free some space or choose another folder (--out)",
    errno.EDQUOT: "the disk quota is exhausted; free some space or choose another folder (--out)",
    errno.EEXIST: "a file of that name is in the way; remove it or choose another path (--out)",
    errno.ENOTDIR: "a file stands where a folder is needed; choose another path (--out)",
    errno.EISDIR: "a folder stands where a file is needed; pass a file path",
    errno.ENOENT: "check the path",
}


def describe_os_error(err: OSError) -> str:
    """One line for an OSError on a user's path: what failed, where, and what to do."""
    where = err.filename if err.filename is not None else "a file"
    reason = (err.strerror or str(err)).lower()
    fix = _OS_FIXES.get(err.errno or 0, "check the path and try again")
    return f"cannot use {where}: {reason}; {fix}"
