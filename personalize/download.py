"""Fetching a dataset's files where that can be automated, and saying how to get the rest."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedsens.personalize.datasets import registry
from fedsens.personalize.errors import UserError


def download(
    name: str, root: str | Path | None = None, *, options: Mapping[str, Any] | None = None, verify: bool = True
) -> str:
    """Fetch `name` into `root` where that can be automated; return what was done or what to do.

    `options` are the dataset's own (its Options, e.g. OrganAMNIST's size: `-d size=64`), checked against
    its keys; `verify` reaches the download where the spec `verifies` files.
    """
    spec = registry.get(name)
    folder = Path(root).expanduser() if root is not None else None
    if spec.download is None:
        if spec.guide is not None:
            return spec.guide(folder)
        return f"{name}: {spec.instructions(folder or 'DIR')}"
    kwargs: dict[str, Any] = dataclasses.asdict(spec.resolve_options(options or {}))
    if spec.verifies:
        kwargs["verify"] = verify
    if folder is None:
        raise UserError(f"downloading {name} needs --root DIR (root=...), the folder to download into")
    folder.mkdir(parents=True, exist_ok=True)
    return spec.download(folder, **kwargs)
