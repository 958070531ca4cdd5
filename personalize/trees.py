"""Walking a user's folder of images safely: a symbolic link that leads back into the tree above it (a loop)
is an error naming the link, and a folder reached by two paths is read once.

`os.walk(followlinks=True)`, which torchvision's ImageFolder uses, follows a loop until the OS refuses the
path (some 40 levels down), so one `loop -> ..` link multiplies a class's images and files other classes'
images under it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

from fedsens.personalize.errors import UserError


def check_root(root: Path | str, what: str) -> Path:
    """`root` as given, unless it is a symbolic link loop (a link to itself, or links to each other): one line."""
    path = Path(root)
    if _is_loop(path):
        raise UserError(f"{what} {path} is a symbolic link loop (it points back at itself); point it at a folder")
    return path


def check_no_loops(top: Path | str, what: str) -> None:
    """Raise a UserError naming the first symbolic link under `top` that leads back to a folder above it
    (or to itself)."""
    top = Path(top)
    _walk(top, {os.path.realpath(top)}, what, top)


def _walk(folder: Path, ancestors: set[str], what: str, top: Path) -> None:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return  # unreadable: the reader that opens it says so
    for entry in entries:
        if entry.is_symlink() and _is_loop(Path(entry.path)):
            raise UserError(_loop_line(what, Path(entry.path), top))
        if not entry.is_dir(follow_symlinks=True):
            continue
        real = os.path.realpath(entry.path)
        if real in ancestors:
            raise UserError(_loop_line(what, Path(entry.path), top))
        _walk(Path(entry.path), ancestors | {real}, what, top)


def _is_loop(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as err:
        return err.errno == errno.ELOOP
    return False


def _loop_line(what: str, link: Path, top: Path) -> str:
    return (
        f"{what} {top} holds a symbolic link loop: {link} -> {os.readlink(link)} leads back into the folders "
        "above it; remove that link"
    )


def read_once() -> Callable[[str], bool]:
    """An ImageFolder `is_valid_file` that accepts each real file once (a folder linked twice is read once),
    given the image extensions check it replaces."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    seen: set[str] = set()

    def valid(path: str) -> bool:
        if not has_file_allowed_extension(path, IMG_EXTENSIONS):
            return False
        real = os.path.realpath(path)
        if real in seen:
            return False
        seen.add(real)
        return True

    return valid
