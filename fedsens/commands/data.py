"""`fedsens data download NAME --root DIR` and `fedsens data list`: fetch a dataset or say how to get it;
list the registered datasets with their defaults and whether their files are present."""

from __future__ import annotations

from pathlib import Path

import typer

from fedsens.commands._common import clean_errors
from fedsens.personalize import options as options_lib
from fedsens.personalize.datasets import registry

NO_VERIFY_HELP = "Skip the files' checksum check (CIFAR-100's md5): for dataset files you wrote yourself."


def dataset_help(lead: str = "Dataset") -> str:
    """'Dataset: digits, synthetic, ...' from the registry (torch-free, so `fedsens --help` stays quick)."""
    return f"{lead}: {', '.join(registry.names())}."


@clean_errors
def download(
    name: str = typer.Argument(..., help=dataset_help()),
    root: Path | None = typer.Option(
        None, "--root", help="Folder to download into (cifar100, organamnist) or to lay Office-Home out in."
    ),
    data_option: list[str] | None = typer.Option(
        None,
        "--data-option",
        "-d",
        help="the dataset's own option KEY=VALUE (`fedsens data list`), e.g. -d size=64 for OrganAMNIST's 64 px",
    ),
    no_verify: bool = typer.Option(False, "--no-verify", help=NO_VERIFY_HELP),
) -> None:
    """Download CIFAR-100 or OrganAMNIST; print where to get Office-Home and its layout."""
    from fedsens.personalize.download import download as fetch
    from fedsens.personalize.options import parse_assignments

    options = parse_assignments(data_option, flag="-d", example="size=64", lister="fedsens data list")
    typer.echo(fetch(name, root, options=options, verify=not no_verify))


@clean_errors
def list_datasets(
    data_root: Path | None = typer.Option(None, "--data-root", help="Folder to look for each dataset's files in."),
) -> None:
    """Every dataset fedsens knows: its defaults, and whether its files are under --data-root."""
    for spec in registry.specs():
        present = registry.is_present(spec.name, data_root)
        state = {True: "present", False: "missing", None: "unknown"}[present]
        if not spec.needs_root:
            state = "built in"
        shape = ", ".join(
            text
            for text in (
                f"{spec.channels} ch" if spec.channels else "",
                f"{spec.image_size} px" if spec.image_size else "any px",
                f"{spec.classes} classes" if spec.classes else "",
            )
            if text
        )
        typer.echo(f"{spec.name:<12} {state:<9} {spec.summary}")
        defaults = f"test fraction {spec.test_fraction:g}, scheme {spec.scheme}, {shape}"
        if spec.domains:
            defaults += ", domains"
        typer.echo(f"{'':<22} defaults: {defaults}")
        for key, (option, kind) in options_lib.fields_of(spec.Options).items():
            help_text = option.metadata.get("help", "")
            typer.echo(f"{'':<22} -d {key}={option.default}  ({options_lib.type_name(kind)}) {help_text}".rstrip())
        if present is not True and spec.needs_root:
            typer.echo(f"{'':<22} get it: {spec.instructions(data_root or 'DIR')}")
