"""`fedsens data download NAME --root DIR`: fetch a dataset, or say how to get it."""

from __future__ import annotations

from pathlib import Path

import typer

from fedsens.commands._common import clean_errors


@clean_errors
def download(
    name: str = typer.Argument(..., help="Dataset: digits, synthetic, cifar100, organamnist, officehome."),
    root: Path | None = typer.Option(
        None, "--root", help="Folder to download into (cifar100, organamnist) or to lay Office-Home out in."
    ),
    size: int = typer.Option(28, "--size", help="OrganAMNIST image size: 28, 64, 128 or 224."),
) -> None:
    """Download CIFAR-100 or OrganAMNIST; print where to get Office-Home and its layout."""
    from fedsens.personalize.download import download as fetch

    typer.echo(fetch(name, root, size=size))
