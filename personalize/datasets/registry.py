"""The dataset registry: every dataset fedsens knows, with its defaults and how to get its files.

This module imports neither torch nor any reader, so the command line can list the names (choices,
help) instantly. A dataset is one module of this package that calls `register(DatasetSpec(...))`
when imported; it is imported the first time its name is asked for. Code outside the package (a
plugin, a test) registers its own datasets the same way.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsens.personalize import options as options_lib
from fedsens.personalize import trees
from fedsens.personalize.errors import UserError

# Modules of this package that are not datasets; the built-in datasets are listed in this order.
_NOT_DATASETS = ("registry", "imageset", "medmnist_names", "medmnist2d")
_BUILTIN_ORDER = ("digits", "synthetic", "cifar100", "organamnist", "officehome", "imagefolder")


def _groups() -> dict[str, tuple[str, ...]]:
    """Modules that register several datasets -> the names they register (read without importing them)."""
    from fedsens.personalize.datasets.medmnist_names import NAMES  # a plain tuple: no medmnist, no torch

    return {"medmnist2d": NAMES}


DEFAULT_TEST_FRACTION = 0.25

_registry: dict[str, DatasetSpec] = {}


@dataclass(frozen=True)
class NoOptions:
    """The options of a dataset that takes none."""


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: how to load it, the defaults the paper uses for it, and how to get its files.

    `load(root, **options)` returns an ImageSet; `root` is None for datasets that need no files.
    `download(root, **options)` fetches the files and returns a one-line report; without it,
    `fedsens data download` prints `guide(root)` (or the one-line `how_to_get(root, **options)`). `present(root)` says
    whether the files are under root. `decodes_at` names the loader keyword that sets the decoded
    image size (the run passes the model's input size to it); None keeps the native size.

    `Options` (a frozen dataclass, one line of help per field in `field(metadata={"help": ...})`) holds
    the loader's own keywords, set with `--data-option KEY=VALUE` and listed by `fedsens data list`.
    The run's own settings reach the loader where the spec says it takes them: `verify` (checksums,
    `verifies`), `quiet` (progress, `reports_progress`) and the decoded size (`decodes_at`).
    """

    name: str
    load: Callable[..., Any]
    summary: str
    test_fraction: float = DEFAULT_TEST_FRACTION
    domains: bool = False
    scheme: str = "dirichlet"
    needs_root: bool = False
    image_size: int | None = None  # native side in pixels, where fixed
    channels: int | None = None
    classes: int | None = None
    how_to_get: Callable[..., str] | None = None
    download: Callable[..., str] | None = None
    guide: Callable[[Path | None], str] | None = None  # what `data download` prints when nothing is fetched
    present: Callable[[Path], bool] | None = None
    decodes_at: str | None = None
    Options: type = NoOptions
    verifies: bool = False
    reports_progress: bool = False

    def loader_keywords(self) -> list[str]:
        """Every keyword the loader takes: its options, then the run's settings the spec says it takes."""
        run = [k for k, takes in (("verify", self.verifies), ("quiet", self.reports_progress)) if takes]
        return [*options_lib.fields_of(self.Options), *run, *([self.decodes_at] if self.decodes_at else [])]

    def resolve_options(self, given: Mapping[str, Any]) -> Any:
        """The dataset's Options from a mapping (`-d KEY=VALUE`): one UserError line naming the valid keys."""
        return options_lib.resolve(self.Options, given, owner=f"dataset {self.name}")

    def instructions(self, root: Path | str = "DIR", **options: Any) -> str:
        """One line: how to get this dataset's files into root."""
        if self.how_to_get is not None:
            return self.how_to_get(root, **options)
        if self.download is not None:
            return f"run `fedsens data download {self.name} --root {root}`"
        return f"{self.name} needs no files"

    def require_root(self, root: Path | None, **options: Any) -> Path:
        """The root folder, or a UserError saying how to get the files when none was given."""
        if root is None:
            raise UserError(
                f"dataset {self.name!r} needs a data root folder; {self.instructions(**options)} "
                "and pass that DIR as --data-root DIR"
            )
        return trees.check_root(root, f"the {self.name} data root")  # a link loop reads as "not found" otherwise


def register(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
    """Make `spec` loadable by name (`fedsens train --dataset NAME`, `data.load(NAME)`)."""
    if spec.name in _registry and not replace and _registry[spec.name] is not spec:
        raise ValueError(f"dataset {spec.name!r} is registered already (pass replace=True to override it)")
    _registry[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _registry.pop(name, None)


def _package_modules() -> list[str]:
    package = sys.modules[__package__ or ""]  # the datasets package: its folder(s) hold one module per dataset
    found = {m.name for m in pkgutil.iter_modules(package.__path__)}
    found = {name for name in found if not name.startswith("_") and name not in _NOT_DATASETS}
    return [n for n in _BUILTIN_ORDER if n in found] + sorted(found - set(_BUILTIN_ORDER))


def names() -> tuple[str, ...]:
    """Every dataset name, the embedded default (digits) first; imports no dataset module."""
    builtin = [*_package_modules(), *(name for names in _groups().values() for name in names)]
    return (*builtin, *(name for name in _registry if name not in builtin))


def get(name: str) -> DatasetSpec:
    """The spec of dataset `name`, importing its module on first use; a UserError naming the choices."""
    if name not in _registry and name in _package_modules():
        importlib.import_module(f"{__package__}.{name}")
    for module, grouped in _groups().items():
        if name not in _registry and name in grouped:
            importlib.import_module(f"{__package__}.{module}")
    if name not in _registry:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(names())}")
    return _registry[name]


def specs() -> list[DatasetSpec]:
    return [get(name) for name in names()]


def test_fraction(name: str, given: float | None = None) -> float:
    """The per-client test share: the one given, else the dataset's default."""
    return given if given is not None else get(name).test_fraction


def dataset_defaults(name: str) -> dict:
    """Per-dataset settings from the paper: the per-client test share, domains, default scheme, files."""
    spec = get(name)
    return {
        "test_fraction": spec.test_fraction,
        "domains": spec.domains,
        "scheme": spec.scheme,
        "needs_root": spec.needs_root,
    }


def load(name: str, root: str | Path | None = None, **options: Any):
    """Load dataset `name` (from `root` for datasets with files); `options` are its loader's keywords."""
    spec = get(name)
    known = spec.loader_keywords()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UserError(
            f"unknown option(s) {', '.join(unknown)} for dataset {name!r}; it takes: {', '.join(known) or 'none'}"
        )
    return spec.load(None if root is None else Path(root).expanduser(), **options)


def load_for_run(
    name: str,
    root: str | Path | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    input_size: int | None = None,
    verify: bool = True,
    quiet: bool = False,
):
    """Load a dataset for training: with its `options` (`--data-option`, checked against its Options),
    decoded at the model's input size where the dataset decodes images (Office-Home), with the md5 check on
    unless `verify` is False, quiet where the loader reports progress."""
    spec = get(name)
    keywords: dict[str, Any] = dataclasses.asdict(spec.resolve_options(options or {}))
    if spec.decodes_at is not None and input_size is not None:
        keywords[spec.decodes_at] = input_size
    if spec.verifies:
        keywords["verify"] = verify
    if spec.reports_progress:
        keywords["quiet"] = quiet
    return load(name, root, **keywords)


def is_present(name: str, root: str | Path | None) -> bool | None:
    """Whether the dataset's files are under root (True for datasets without files; None: cannot tell)."""
    spec = get(name)
    if not spec.needs_root:
        return True
    if root is None:
        return False
    return spec.present(Path(root).expanduser()) if spec.present is not None else None


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
