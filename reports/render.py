"""A report as a list of plain blocks, rendered to one self-contained HTML file and to Markdown.

The HTML embeds every figure as a base64 PNG data URI and carries its CSS inline: no scripts,
no external URLs, so it opens offline from disk and can be mailed as one file.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class Heading:
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str
    lead: bool = False  # the headline a reader should see first


@dataclass(frozen=True)
class Note:
    text: str


@dataclass(frozen=True)
class Table:
    title: str
    frame: pd.DataFrame
    collapsed: bool = False  # long tables go in a <details> element, closed


@dataclass(frozen=True)
class FigureBlock:
    name: str  # file stem: <name>.png / <name>.svg beside index.html
    caption: str
    png: bytes


Block = Heading | Paragraph | Note | Table | FigureBlock

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #1d232b; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #d6dbe1; padding-bottom: .2rem; }
.lead { font-size: 1.1rem; background: #eef5ff; border-left: 4px solid #2f6fd1; padding: .6rem .9rem; }
.note { background: #fff6e0; border-left: 4px solid #d19a2f; padding: .4rem .8rem; margin: .4rem 0; }
.sub { color: #5a6470; margin-top: 0; }
table.frame { border-collapse: collapse; font-size: .85rem; margin: .5rem 0 1rem; }
table.frame th, table.frame td { border: 1px solid #d6dbe1; padding: .2rem .5rem; text-align: right; }
table.frame th { background: #f2f4f7; }
table.frame tr:nth-child(even) td { background: #fafbfc; }
figure { margin: 1.2rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e7ec; }
figcaption { font-size: .9rem; color: #39424d; margin-top: .3rem; }
details summary { cursor: pointer; font-weight: 600; margin: .4rem 0; }
"""


def format_float(value: float) -> str:
    """Four significant digits, but big counts (bytes, parameters) in full with thousands commas."""
    if abs(value) >= 1e4 and float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:.4g}"


def render_html(title: str, subtitle: str, blocks: list[Block]) -> str:
    """One self-contained HTML page: inline CSS, figures as PNG data URIs."""
    body = "\n".join(_html_block(block) for block in blocks)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f'<h1>{html.escape(title)}</h1>\n<p class="sub">{html.escape(subtitle)}</p>\n'
        f"{body}\n</body>\n</html>\n"
    )


def _html_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"<h2>{html.escape(block.text)}</h2>"
    if isinstance(block, Paragraph):
        css = ' class="lead"' if block.lead else ""
        return f"<p{css}>{html.escape(block.text)}</p>"
    if isinstance(block, Note):
        return f'<p class="note">{html.escape(block.text)}</p>'
    if isinstance(block, Table):
        table = block.frame.to_html(
            index=False, classes="frame", border=0, float_format=format_float, na_rep="", escape=True
        )
        if block.collapsed:
            return f"<details><summary>{html.escape(block.title)}</summary>\n{table}\n</details>"
        return f"<h3>{html.escape(block.title)}</h3>\n{table}"
    if isinstance(block, FigureBlock):
        data = base64.b64encode(block.png).decode("ascii")
        caption = html.escape(block.caption)
        return (
            f'<figure id="{html.escape(block.name)}">'
            f'<img src="data:image/png;base64,{data}" alt="{caption}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    raise TypeError(f"unknown report block {block!r}")


def render_markdown(title: str, subtitle: str, blocks: list[Block]) -> str:
    """The same report as Markdown, with figures linked as the PNG files beside it."""
    lines = [f"# {title}", "", f"_{subtitle}_", ""]
    for block in blocks:
        lines.extend(_markdown_block(block))
        lines.append("")
    return "\n".join(lines)


def _markdown_block(block: Block) -> list[str]:
    if isinstance(block, Heading):
        return [f"## {block.text}"]
    if isinstance(block, Paragraph):
        return [f"**{block.text}**" if block.lead else block.text]
    if isinstance(block, Note):
        return [f"> Note: {block.text}"]
    if isinstance(block, Table):
        return [f"### {block.title}", "", *markdown_table(block.frame)]
    if isinstance(block, FigureBlock):
        return [f"![{block.name.replace('_', ' ')}]({block.name}.png)", "", f"*{block.caption}*"]
    raise TypeError(f"unknown report block {block!r}")


def markdown_table(frame: pd.DataFrame) -> list[str]:
    """A pipe table (pandas' own to_markdown needs the optional `tabulate` package)."""

    def cell(value) -> str:
        if isinstance(value, float):
            return "" if pd.isna(value) else format_float(value)
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(column) for column in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(cell(value) for value in row) + " |" for row in frame.itertuples(index=False)]
    return [header, rule, *rows]
