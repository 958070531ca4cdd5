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


# {elsewhere}: how the command that failed can write somewhere else (its --out, or a copy of its folder).
_OS_FIXES = {
    errno.EACCES: "check its permissions or {elsewhere}",
    errno.EPERM: "check its permissions or {elsewhere}",
    errno.EROFS: "the file system is read-only; {elsewhere}",
    errno.ENOSPC: "the disk is full; free some space or {elsewhere}",
    errno.EDQUOT: "the disk quota is exhausted; free some space or {elsewhere}",
    errno.EEXIST: "a file of that name is in the way; remove it or {elsewhere}",
    errno.ENOTDIR: "a file stands where a folder is needed; {elsewhere}",
    errno.EISDIR: "a folder stands where a file is needed; pass a file path",
    errno.ENOENT: "check the path",
    errno.ELOOP: "a symbolic link there points back at itself; remove the loop",
}
# Errors about the machine's disks and permissions rather than fedsens: one line even without a file name.
ENVIRONMENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EIO})
WITH_OUT = "choose another folder (--out)"
WITHOUT_OUT = "copy the folder somewhere writable and run the command on the copy"


def describe_os_error(err: OSError, elsewhere: str = WITH_OUT) -> str:
    """One line for an OSError on a user's path: what failed, where, and what to do (`elsewhere`: how the
    command can write somewhere else)."""
    where = err.filename if err.filename is not None else "a file"
    reason = (err.strerror or str(err)).lower()
    fix = _OS_FIXES.get(err.errno or 0, "check the path and try again").format(elsewhere=elsewhere)
    return f"cannot use {where}: {reason}; {fix}"
