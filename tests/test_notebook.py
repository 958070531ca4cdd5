"""The walk-through notebook runs top to bottom (so it cannot rot) and is committed without outputs."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "the walk-through has no code"
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    # The kernel is a fresh process in tmp_path: it must find the project even when it is not installed.
    root = str(NOTEBOOK.parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the failing cell's traceback, on any error

    sweep = tmp_path / "walkthrough" / "sweep"
    assert (sweep / "ranking.csv").is_file() and (sweep / "report" / "index.html").is_file()
    assert (tmp_path / "walkthrough" / "run" / "rounds.csv").is_file()
    last = notebook.cells[-1]
    assert any("image/png" in output.get("data", {}) for output in last.outputs)
