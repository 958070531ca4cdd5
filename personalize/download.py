"""Fetching a dataset's files where that can be automated, and saying how to get the rest."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from fedsens.personalize.datasets import registry
from fedsens.personalize.errors import UserError


def download(name: str, root: str | Path | None = None, **options: Any) -> str:
    """Fetch `name` into `root` where that can be automated; return what was done or what to do.

    `options` go to the dataset's download function where it takes them (OrganAMNIST: size).
    """
    spec = registry.get(name)
    folder = Path(root).expanduser() if root is not None else None
    if spec.download is None:
        if spec.guide is not None:
            return spec.guide(folder)
        return f"{name}: {spec.instructions(folder or 'DIR')}"
    accepted = inspect.signature(spec.download).parameters
    kwargs = {key: value for key, value in options.items() if key in accepted}
    if folder is None:
        raise UserError(f"downloading {name} needs --root DIR (root=...), the folder to download into")
    folder.mkdir(parents=True, exist_ok=True)
    return spec.download(folder, **kwargs)
