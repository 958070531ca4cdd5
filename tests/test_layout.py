"""The layout static tools follow: fedsens/ holds the whole import name, and mypy resolves every internal import."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_top_level_folders_are_linked_into_the_one_import_name():
    for name in ("personalize", "sensitivity", "reports"):
        link = ROOT / "fedsens" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve(), link


def test_mypy_ignores_missing_imports_of_third_party_packages_only():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert not config.get("ignore_missing_imports", False)  # an unresolved fedsens import is an error
    assert config["files"] == ["fedsens"]
    for override in config.get("overrides", []):
        modules = override["module"] if isinstance(override["module"], list) else [override["module"]]
        assert not any(m.split(".")[0] == "fedsens" for m in modules), modules
