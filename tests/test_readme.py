"""The README's Python sections run as written (tiny settings), so they cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedsens.personalize import datasets

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(heading: str) -> list[str]:
    """The ```python blocks of the README section under `## heading` (up to the next `## `)."""
    text = README.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else None]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.parametrize("heading", ["Use it from Python", "Add a dataset"])
def test_the_readme_section_runs(heading, tmp_path, monkeypatch, capsys):
    blocks = python_blocks(heading)
    assert blocks, f"no python block under '## {heading}'"
    monkeypatch.chdir(tmp_path)  # the examples write under runs/
    try:
        for block in blocks:
            exec(compile(block, f"README.md ({heading})", "exec"), {"__name__": "readme"})
    finally:
        datasets.unregister("stripes")
    printed = capsys.readouterr().out
    if heading == "Use it from Python":
        assert (tmp_path / "runs/py/compare/report/index.html").is_file() and "bad input: --rounds" in printed
        assert (tmp_path / "runs/py/sweep/ranking.csv").is_file()
    else:
        assert (tmp_path / "runs/stripes/rounds.csv").is_file() and '"dataset": "stripes"' in (
            tmp_path / "runs/stripes/config.json"
        ).read_text()
