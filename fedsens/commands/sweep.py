"""`fedsens sweep`: which parts of the ViT are most sensitive to client heterogeneity."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from fedsens.commands._common import clean_errors, comma_list, overlay
from fedsens.personalize.errors import UserError

if TYPE_CHECKING:  # the library is imported when the command runs, so `fedsens --help` stays quick
    from fedsens.sensitivity.sweep import SweepConfig, SweepResult

PRESET_NOTE = "Explicit options override the preset's values (a preset never overrides an option you give)."


def build_config(name: str, *, run: dict, sweep: dict) -> SweepConfig:
    """The preset with every explicitly given option (not None) laid over it."""
    from fedsens.sensitivity.sweep import preset

    return overlay(preset(name), run=run, grid=sweep)


def ranking_text(result: SweepResult) -> str:
    """The accuracy ranking with its intervals, and how well each divergence metric predicts it."""
    import pandas as pd

    from fedsens.sensitivity import ranking as ranking_lib

    lines = []
    ranking = result.ranking
    for (dataset, scheme, alpha), table in ranking.groupby(["dataset", "scheme", "alpha"], sort=False):
        gain = table[table["metric"] == ranking_lib.GAIN]
        shown = gain.assign(rank=gain["rank"].astype("Int64"))[["rank", "part", "score", "ci_low", "ci_high"]].rename(
            columns={"score": "gain_vs_fedavg", "ci_low": "ci95_low", "ci_high": "ci95_high"}
        )
        lines.append(
            f"\n{dataset} / {scheme} / alpha {alpha:g}: parts by accuracy gain over FedAvg "
            "(mean over seeds, 95% t-interval; 'all' = local only, not ranked)"
        )
        lines.append(shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:+.4f}"))
        divergence = table[table["metric"] != ranking_lib.GAIN].groupby("metric", sort=False)
        summary = pd.DataFrame(
            [
                dict(
                    metric=metric,
                    order=" > ".join(rows.dropna(subset=["rank"])["part"]),
                    spearman_vs_gain=rows["spearman_vs_gain"].iloc[0],
                )
                for metric, rows in divergence
            ]
        )
        if len(summary):
            lines.append(
                "divergence in the FedAvg cells, most sensitive first, and its agreement with the gain ranking:"
            )
            lines.append(summary.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:+.2f}"))
    return "\n".join(lines)


@clean_errors
def sweep(
    preset_name: str = typer.Option(
        "quick", "--preset", help=f"quick | paper-cifar100 | paper-organamnist | paper-officehome. {PRESET_NOTE}"
    ),
    dataset: str | None = typer.Option(None, help="Dataset (comma-separate several)."),
    data_root: str | None = typer.Option(None, help="Folder holding the dataset's files."),
    model: str | None = typer.Option(None, help="Model preset, e.g. vit-micro or vit_small_patch16_224."),
    parts: list[str] | None = typer.Option(
        None,
        "--parts",
        help="An extra cell's part spec, e.g. attn,head or attn@9-11 or blocks.3 (repeat the option "
        "for several). Added to the default cells (FedAvg, each part type, local only) unless --only-parts.",
    ),
    only_parts: bool = typer.Option(False, "--only-parts", help="Run FedAvg and the --parts cells only."),
    seeds: str | None = typer.Option(None, help="Comma-separated seeds, e.g. 0,1,2 (quick preset: 0,1,2)."),
    scheme: str | None = typer.Option(None, help="Partition scheme(s): dirichlet, pathological, iid, domain."),
    alphas: str | None = typer.Option(None, help="Comma-separated Dirichlet alphas, e.g. 0.1,0.5."),
    clients: int | None = typer.Option(None, help="Number of clients."),
    join_ratio: float | None = typer.Option(None, help="Share of clients sampled each round."),
    rounds: int | None = typer.Option(None, help="Federated rounds per cell."),
    local_epochs: int | None = typer.Option(None, help="Local epochs per round."),
    div_every: int | None = typer.Option(None, help="Record the divergence metrics every N rounds."),
    out: str = typer.Option("runs/sweep", help="Sweep folder (finished cells in it are reused)."),
    fresh: bool = typer.Option(False, "--fresh", help="Re-run every cell instead of resuming."),
    device: str | None = typer.Option(None, help="auto (CUDA when present), cpu or cuda."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    jobs: int | None = typer.Option(
        None,
        "--jobs",
        help="Cells trained at a time in worker processes on this machine, each with --threads torch threads "
        "(1: one after another in this process; quick preset: the number of cores, else 1; "
        "with GPUs one cell per GPU, round-robin).",
    ),
    executor: str = typer.Option("local", "--executor", help="local (this machine) or ray (one Ray task per cell)."),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="With --executor ray: auto or HOST:PORT of a cluster (default: start one here)."
    ),
    cpus_per_cell: float = typer.Option(1.0, "--cpus-per-cell", help="With --executor ray: CPUs per cell."),
    gpus_per_cell: float | None = typer.Option(
        None, "--gpus-per-cell", help="GPUs per cell (default: 1 where there are GPUs, else 0)."
    ),
) -> None:
    """Run one federated cell per (partition, seed, part kept local), then rank the parts.

    Writes sensitivity.csv, ranking.csv and the cells' tables under --out and prints the ranking.
    """
    from fedsens.sensitivity import executors
    from fedsens.sensitivity.sweep import DEFAULT_PARTS, run_sweep

    if only_parts and not parts:
        raise UserError("--only-parts needs at least one --parts spec")
    cell_parts = tuple(parts or ()) if only_parts else (*DEFAULT_PARTS, *(parts or ()))
    config = build_config(
        preset_name,
        run=dict(
            data_root=data_root,
            model=model,
            clients=clients,
            join_ratio=join_ratio,
            rounds=rounds,
            local_epochs=local_epochs,
            device=device,
        ),
        sweep=dict(
            parts=cell_parts,
            out=out,
            fresh=fresh,
            quiet=quiet,
            div_every=div_every,
            seeds=comma_list(seeds, int, "--seeds", "0,1,2"),
            datasets=comma_list(dataset, str, "--dataset", "digits,synthetic"),
            schemes=comma_list(scheme, str, "--scheme", "dirichlet,iid"),
            alphas=comma_list(alphas, float, "--alphas", "0.1,0.5"),
        ),
    )
    default_jobs = executors.cores() if preset_name == "quick" else 1
    where = executors.from_options(executor, jobs, default_jobs, cpus_per_cell, gpus_per_cell, ray_address)
    result = run_sweep(config, where)
    typer.echo(ranking_text(result))
    typer.echo(
        f"\n{len(result.ran)} cells trained, {len(result.skipped)} reused, {len(result.failed)} failed "
        f"in {result.seconds:.0f} s; tables in {result.out}"
    )
    for name in result.failed:
        typer.echo(f"failed: {name} (see {result.out / 'cells' / name / 'error.txt'})", err=True)
