"""`import fedsens`: the public API, imported lazily; the installed distribution claims only `fedsens`."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fedsens

REPO = Path(__file__).resolve().parents[1]
PUBLIC = ("RunConfig", "run", "SweepConfig", "run_sweep", "CompareConfig", "run_compare", "build_report", "UserError")


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_public_names_are_the_library_objects():
    from fedsens.personalize.config import RunConfig
    from fedsens.personalize.errors import UserError
    from fedsens.personalize.federation import run
    from fedsens.reports.report import build_report
    from fedsens.sensitivity.compare import CompareConfig, run_compare
    from fedsens.sensitivity.sweep import SweepConfig, run_sweep

    expected = [RunConfig, run, SweepConfig, run_sweep, CompareConfig, run_compare, build_report, UserError]
    assert [getattr(fedsens, name) for name in PUBLIC] == expected
    assert set(PUBLIC) <= set(fedsens.__all__) and set(PUBLIC) <= set(dir(fedsens))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fedsens.nope  # noqa: B018


def test_import_fedsens_and_fedsens_help_load_no_torch():
    code = (
        "import sys, fedsens\n"
        "assert 'torch' not in sys.modules, 'import fedsens'\n"
        "from fedsens.cli import app\n"
        "sys.argv = ['fedsens', '--help']\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        "print('torch loaded' if 'torch' in sys.modules else 'no torch')\n"
        "print('pandas loaded' if 'pandas' in sys.modules else 'no pandas')\n"
        "print(fedsens.UserError.__name__)\n"
    )
    out = _python(code)
    assert "Usage: fedsens" in out and "train" in out and "data" in out
    # neither torch nor pandas: `fedsens --help` measured 0.42-0.56 s on a loaded 2-core machine, 1.0 s with pandas
    assert out.splitlines()[-3:] == ["no torch", "no pandas", "UserError"]


def test_the_installed_distribution_claims_only_fedsens():
    dist = importlib.metadata.distribution("fedsens")
    top_level = (dist.read_text("top_level.txt") or "").split()
    assert top_level == ["fedsens"]
    finder = [f for f in dist.files or () if f.name.startswith("__editable__") and f.suffix == ".py"]
    for path in finder:  # an editable install maps import names to folders: only fedsens.* may appear
        mapping = path.locate().read_text().split("MAPPING", 1)[1].split("\n", 1)[0]
        names = [part.split("'")[1] for part in mapping.split(",") if "': '" in part]
        assert names and all(name == "fedsens" or name.startswith("fedsens.") for name in names), names


def test_a_built_wheel_holds_only_the_fedsens_package(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("fedsens", "personalize", "sensitivity", "reports"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    # setuptools' own PEP 517 backend, as `pip wheel` calls it (no network: the venv's setuptools).
    build = f"from setuptools import build_meta; build_meta.build_wheel({str(tmp_path / 'dist')!r})"
    done = subprocess.run([sys.executable, "-c", build], cwd=source, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("fedsens-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"fedsens"}
    for module in ("personalize/datasets/registry.py", "personalize/datasets/officehome.py", "sensitivity/sweep.py"):
        assert f"fedsens/{module}" in names
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["fedsens"]
