"""CI runs what the README says a user types: both set-up commands come from marked README blocks, and every
dependency has a lower bound that CI installs (.ci/lowest_constraints.py)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def readme_block(name: str) -> str:
    """The command between <!-- name --> and <!-- /name -->, as .ci/run extracts it."""
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- {name} -->\n```\n(.*?)\n```\n<!-- /{name} -->", text, flags=re.S)
    assert found, f"README.md has no {name} block"
    return found[1].strip()


def lowest_constraints():
    spec = importlib.util.spec_from_file_location("lowest_constraints", ROOT / ".ci/lowest_constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_readme_commands_make_a_fresh_environment_and_ci_reads_them():
    main, tests = readme_block("main-command"), readme_block("test-command")
    for command in (main, tests):
        assert command.startswith("python3 -m venv .venv && .venv/bin/pip install -e ")
    # the main command is what a user installs: no extras, so CI sees the newest releases pip picks
    assert ".venv/bin/pip install -e . &&" in main and "[" not in main
    assert ".venv/bin/fedsens sweep" in main and ".venv/bin/fedsens report" in main
    ci = (ROOT / ".ci/run").read_text()
    assert "readme_command main-command" in ci and "readme_command test-command" in ci


def test_every_dependency_has_a_lower_bound_that_ci_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = lowest_constraints().lowest_pins(project["dependencies"])
    assert len(pins) == len(project["dependencies"])
    assert "typer==0.16" in pins and any(pin.startswith("torch==") for pin in pins)


def test_every_optional_dependency_has_a_lower_bound():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for requirements in extras.values():
        outside = [r for r in requirements if not r.startswith("fedsens[")]  # the dev extra names the others
        assert len(lowest_constraints().lowest_pins(outside)) == len(outside)
    assert lowest_constraints().lowest_pins(extras["hf"]) == ["datasets==2.16"]  # pyproject says why 2.16
    assert any(r.startswith("fedsens[") and "hf" in r for r in extras["dev"])  # CI's test command installs it


def test_a_dependency_without_a_lower_bound_is_refused():
    with pytest.raises(SystemExit, match="numpy has no lower bound"):
        lowest_constraints().lowest_pins(["typer>=0.12", "numpy"])
    assert lowest_constraints().lowest_pins(["flwr[simulation]>=1.40,<2"]) == ["flwr==1.40"]


def test_the_script_prints_the_pins(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / ".ci/lowest_constraints.py"), str(ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "pandas==2.0" in done.stdout.splitlines()
