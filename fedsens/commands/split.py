"""`fedsens data split`: partition a dataset among clients, save partition.json, print the table."""

from __future__ import annotations

from pathlib import Path

import typer

from fedsens.commands._common import clean_errors
from fedsens.commands.data import NO_VERIFY_HELP, dataset_help


@clean_errors
def split(
    dataset: str = typer.Option("digits", "--dataset", help=dataset_help("Dataset name")),
    data_root: Path | None = typer.Option(
        None, "--data-root", help="Folder holding the dataset files (not needed for digits)."
    ),
    scheme: str = typer.Option("dirichlet", "--scheme", help="iid, dirichlet, pathological or domain."),
    clients: int = typer.Option(20, "--clients", help="Number of clients."),
    alpha: float = typer.Option(
        0.3, "--alpha", help="Dirichlet concentration (dirichlet/domain): small = strong label skew."
    ),
    classes_per_client: int = typer.Option(2, "--classes-per-client", help="Classes per client (pathological)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the partition."),
    test_fraction: float | None = typer.Option(
        None,
        "--test-fraction",
        help="Share of each client's samples held out for test; default: the dataset's own "
        "(0.25, 0.15 for officehome).",
    ),
    out: Path = typer.Option(Path("runs/partition"), "--out", help="Folder to write partition.json into."),
    quiet: bool = typer.Option(False, "--quiet", help="Print only the one-line summary, not the per-client table."),
    no_verify: bool = typer.Option(False, "--no-verify", help=NO_VERIFY_HELP),
) -> None:
    """Split a dataset among clients, write OUT/partition.json and print a per-client table."""
    from fedsens.personalize import datasets, partition  # deferred: keeps `fedsens --help` fast

    images = datasets.load_for_run(dataset, data_root, verify=not no_verify, quiet=quiet)
    test_fraction = datasets.test_fraction(dataset, test_fraction)
    made = partition.load_or_make(
        partition.manifest_path(out),
        images.labels,
        images.domains,
        classes=images.classes,
        domain_names=images.domain_names,
        scheme=scheme,
        num_clients=clients,
        seed=seed,
        alpha=alpha,
        classes_per_client=classes_per_client,
        test_fraction=test_fraction,
        dataset=dataset,
    )
    if not quiet:
        table = partition.summary_table(made, images.labels, images.domains, images.domain_names)
        typer.echo(table.to_string(index=False))
    used = sum(len(idx) for idx in made.train) + sum(len(idx) for idx in made.test)
    typer.echo(
        f"{made.num_clients} clients, {used} samples ({dataset}, {scheme}), "
        f"hash {made.hash} -> {partition.manifest_path(out)}"
    )
