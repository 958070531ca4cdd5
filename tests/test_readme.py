"""The documentation's Python examples run as written (tiny settings), so they cannot drift from the code; every
Python example in the README and docs/ is one that a test executes, and the README's links lead somewhere."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

from fedsens.personalize import datasets

REPO = Path(__file__).resolve().parents[1]
HEADING = re.compile(r"^(#{1,6}) +(.+?) *#*$")
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", flags=re.S)

# (page, heading) of every section whose ```python blocks a test executes: here, "Add a method" in
# tests/test_registry.py (it needs the method registry's clean-up), and the saved Hugging Face dataset in
# tests/test_huggingface_data.py (it needs the optional datasets package).
EXECUTED = {
    ("docs/api.md", "The Python API"),
    ("docs/extending.md", "Add a dataset"),
    ("docs/extending.md", "Add a method"),
    ("docs/engine.md", None),  # the whole page: tests/test_engine.py runs it
    ("docs/models-and-data.md", "A saved Hugging Face dataset: `huggingface`"),  # tests/test_huggingface_data.py
    ("docs/validate.md", "The planted datasets (`personalize/datasets/planted.py`, dataset name `planted`)"),
}


def headings(text: str) -> list[tuple[int, int, str]]:
    """(line index, level, title) of each Markdown heading outside fenced code."""
    found, fenced = [], False
    for index, line in enumerate(text.splitlines()):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := HEADING.match(line)):
            found.append((index, len(match.group(1)), match.group(2)))
    return found


def section(page: str, heading: str) -> str:
    """The text of `page` under `heading` (any level), up to the next heading of the same or a higher level."""
    text = (REPO / page).read_text()
    lines = text.splitlines(keepends=True)
    marks = headings(text)
    starts = [(index, level) for index, level, title in marks if title == heading]
    assert starts, f"no heading '{heading}' in {page}"
    start, level = starts[0]
    end = next((index for index, other, _ in marks if index > start and other <= level), len(lines))
    return "".join(lines[start:end])


def python_blocks(page: str, heading: str | None) -> list[str]:
    """The ```python blocks under `heading` of `page` (None: of the whole page)."""
    return PYTHON_BLOCK.findall((REPO / page).read_text() if heading is None else section(page, heading))


def anchor(title: str) -> str:
    """A heading's anchor as mkdocs (Python-Markdown's toc) makes it; GitHub agrees for plain titles."""
    ascii_title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    words = re.sub(r"[^\w\s-]", "", ascii_title).strip().lower()
    return re.sub(r"[-\s]+", "-", words)


RUN_HERE = [
    ("docs/api.md", "The Python API"),
    ("docs/extending.md", "Add a dataset"),
    ("docs/validate.md", "The planted datasets (`personalize/datasets/planted.py`, dataset name `planted`)"),
]


@pytest.mark.parametrize(("page", "heading"), RUN_HERE)
def test_the_documented_example_runs(page, heading, tmp_path, monkeypatch, capsys):
    blocks = python_blocks(page, heading)
    assert blocks, f"no python block under '{heading}' in {page}"
    monkeypatch.chdir(tmp_path)  # the examples write under runs/
    namespace = {"__name__": "readme"}
    try:
        for block in blocks:
            exec(compile(block, f"{page} ({heading})", "exec"), namespace)
    finally:
        datasets.unregister("stripes")
    printed = capsys.readouterr().out
    if heading == "The Python API":
        assert (tmp_path / "runs/py/compare/report/index.html").is_file() and "bad input: --rounds" in printed
        assert (tmp_path / "runs/py/sweep/ranking.csv").is_file()
    elif page == "docs/validate.md":  # the registered dataset and the transform give the same images
        assert namespace["data"].images.equal(namespace["same"].images)
    else:
        assert (tmp_path / "runs/stripes/rounds.csv").is_file() and '"dataset": "stripes"' in (
            tmp_path / "runs/stripes/config.json"
        ).read_text()


def test_every_python_example_is_one_a_test_executes():
    pages = ["README.md", *(str(path.relative_to(REPO)) for path in sorted((REPO / "docs").rglob("*.md")))]
    executed = {block for page, heading in EXECUTED for block in python_blocks(page, heading)}
    for page in pages:
        for block in PYTHON_BLOCK.findall((REPO / page).read_text()):
            first = block.strip().splitlines()[0]
            assert block in executed, f"{page}: the python block starting '{first}' is executed by no test"


def test_the_readmes_links_lead_to_files_and_headings_that_exist():
    text = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert "docs/index.md" in local and "docs/sweep-sensitivity.png" in local
    for link in local:
        path, _, fragment = link.partition("#")
        target = REPO / path
        assert target.is_file(), f"README.md links to {link}, which does not exist"
        if fragment:
            titles = [title for _, _, title in headings(target.read_text())]
            assert fragment in {anchor(title) for title in titles}, f"README.md links to {link}: no such heading"


def test_the_site_lists_every_page():
    nav = (REPO / "mkdocs.yml").read_text()
    for page in sorted((REPO / "docs").rglob("*.md")):
        assert f": {page.relative_to(REPO / 'docs')}\n" in nav, f"mkdocs.yml's nav does not list {page.name}"
