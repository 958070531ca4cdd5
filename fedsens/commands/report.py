"""`fedsens report DIR`: figures and a self-contained HTML report from a run, sweep, comparison or benchmark folder."""

from __future__ import annotations

from pathlib import Path

import typer

from fedsens.commands._common import clean_errors


@clean_errors
def report(
    folder: Path = typer.Argument(
        ..., help="A run, sweep, comparison or benchmark folder (--out of train / sweep / compare / bench)."
    ),
    open_browser: bool = typer.Option(False, "--open", help="Open the report in the default browser."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Write DIR/report/index.html (figures embedded, works offline) and DIR/report/report.md."""
    from fedsens.reports.report import build_report

    index = build_report(folder, open_browser=open_browser, quiet=quiet)
    size = index.stat().st_size
    typer.echo(f"report: {index} ({size / 1024:.0f} KiB); figures and report.md beside it")
