"""The layout static tools follow: fedsens/ holds the whole import name, and mypy resolves every internal import."""

from __future__ import annotations

import ast
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


def _product_modules() -> list[Path]:
    return sorted(p for top in ("fedsens", "personalize", "sensitivity", "reports") for p in (ROOT / top).rglob("*.py"))


def _private_uses(tree: ast.Module) -> list[str]:
    """`from fedsens.x import _y`, and `m._y` where `m` names something imported from fedsens."""
    found, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedsens"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            aliases |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("fedsens")}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    offences = {}
    for path in _product_modules():
        uses = _private_uses(ast.parse(path.read_text()))
        if uses:
            offences[str(path.relative_to(ROOT))] = uses
    assert not offences


def test_the_private_name_check_sees_both_spellings():
    code = (
        "from fedsens.personalize.federation import _x\nfrom fedsens.personalize import federation\nfederation._y()\n"
    )
    assert len(_private_uses(ast.parse(code))) == 2


def test_no_namespace_object_stands_in_for_a_typed_state():
    assert not [p for p in _product_modules() if "SimpleNamespace" in p.read_text()]
