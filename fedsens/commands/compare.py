"""`fedsens compare`: FedPerfix and the baselines, methods x seeds on one dataset and partition."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from fedsens.commands._common import clean_errors, comma_list, overlay

if TYPE_CHECKING:  # the library is imported when the command runs, so `fedsens --help` stays quick
    from fedsens.sensitivity.compare import CompareConfig, CompareResult


def build_config(name: str, *, run: dict, compare: dict) -> CompareConfig:
    """The preset with every explicitly given option (not None) laid over it."""
    from fedsens.sensitivity.compare import preset

    return overlay(preset(name), run=run, grid=compare)


def summary_text(result: CompareResult) -> str:
    table = result.summary.rename(
        columns={
            "accuracy": "accuracy % (final)",
            "acc_best": "best-round %",
            "client_std": "client sd %",
            "comm_mb_per_round": "MB/round",
            "seconds_per_round": "s/round",
        }
    )
    shown = table[
        ["method", "accuracy % (final)", "best-round %", "client sd %", "local_params", "MB/round", "s/round", "seeds"]
    ]
    return shown.to_string(index=False, float_format=lambda v: f"{v:.2f}")


@clean_errors
def compare(
    preset_name: str = typer.Option(
        "default",
        "--preset",
        help="default (digits on the CPU) | paper-cifar100 | "
        "paper-organamnist | paper-officehome. Options you give override the preset.",
    ),
    methods: str | None = typer.Option(
        None, help="Comma-separated methods (default: all eleven), e.g. fedavg,fedper,fedperfix."
    ),
    seeds: str | None = typer.Option(None, help="Comma-separated seeds, e.g. 0,1,2."),
    dataset: str | None = typer.Option(None, help="digits, synthetic, cifar100, organamnist, officehome."),
    data_root: str | None = typer.Option(None, help="Folder holding the dataset's files."),
    model: str | None = typer.Option(None, help="Model preset, e.g. vit-micro or vit_small_patch16_224."),
    rounds: int | None = typer.Option(None, help="Federated rounds per run."),
    clients: int | None = typer.Option(None, help="Number of clients."),
    alpha: float | None = typer.Option(None, help="Dirichlet concentration (small = strong label skew)."),
    out: str | None = typer.Option(None, help="Comparison folder (finished runs in it are reused)."),
    fresh: bool = typer.Option(False, "--fresh", help="Re-run every method instead of resuming."),
    device: str | None = typer.Option(None, help="auto (CUDA when present), cpu or cuda."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    jobs: int | None = typer.Option(
        None,
        "--jobs",
        help="Runs trained at a time in worker processes on this machine, each with --threads torch threads "
        "(1: one after another in this process; default 1; with GPUs one run per GPU, round-robin).",
    ),
    executor: str = typer.Option("local", "--executor", help="local (this machine) or ray (one Ray task per run)."),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="With --executor ray: auto or HOST:PORT of a cluster (default: start one here)."
    ),
    cpus_per_cell: float = typer.Option(1.0, "--cpus-per-cell", help="With --executor ray: CPUs per run."),
    gpus_per_cell: float | None = typer.Option(
        None, "--gpus-per-cell", help="GPUs per run (default: 1 where there are GPUs, else 0)."
    ),
) -> None:
    """Run each method for each seed (same partition and initial weights within a seed), then tabulate.

    Writes comparison.csv, summary.csv and the runs' rounds/metrics tables under --out and prints
    the summary: final-round mean client accuracy (mean ± sd over seeds) and each method's costs.
    """
    from fedsens.sensitivity import executors
    from fedsens.sensitivity.compare import run_compare

    config = build_config(
        preset_name,
        run=dict(
            dataset=dataset,
            data_root=data_root,
            model=model,
            rounds=rounds,
            clients=clients,
            alpha=alpha,
            device=device,
        ),
        compare=dict(
            methods=comma_list(methods, str, "--methods", "fedavg,fedperfix"),
            seeds=comma_list(seeds, int, "--seeds", "0,1,2"),
            out=out,
            fresh=fresh,
            quiet=quiet,
        ),
    )
    where = executors.from_options(executor, jobs, 1, cpus_per_cell, gpus_per_cell, ray_address)
    result = run_compare(config, where)
    typer.echo(f"\n{config.run.dataset}, {config.run.model}, {config.run.clients} clients, {config.run.rounds} rounds:")
    typer.echo(summary_text(result))
    typer.echo(
        f"\n{len(result.ran)} runs trained, {len(result.skipped)} reused, {len(result.failed)} failed "
        f"in {result.seconds:.0f} s; tables in {result.out}"
    )
    for name in result.failed:
        typer.echo(f"failed: {name} (see {result.out / 'runs' / name / 'error.txt'})", err=True)
