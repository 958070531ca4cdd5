"""`fedsens sweep`: which parts of the ViT are most sensitive to client heterogeneity."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from fedsens.commands._common import clean_errors, comma_list, overlay
from fedsens.commands._options import Execution, executor_options, training_options
from fedsens.commands.data import NO_VERIFY_HELP, dataset_help
from fedsens.commands.methods import method_option, options_option
from fedsens.personalize import presets
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
    from fedsens.sensitivity import sanity

    lines = []
    ranking = result.ranking
    for (dataset, scheme, alpha), table in ranking.groupby(["dataset", "scheme", "alpha"], sort=False):
        gain = table[table["metric"] == ranking_lib.GAIN]
        columns = ["rank", "part", "score", "ci_low", "ci_high", "boot_low", "boot_high", "score_last"]
        shown = gain.assign(rank=gain["rank"].astype("Int64"))[columns].rename(
            columns={"score": "gain_tail", "ci_low": "t95_low", "ci_high": "t95_high", "score_last": "gain_final"}
        )
        if "local_params" in gain:  # the cost: local parameters per client and the gain per 10k of them
            shown["local_params"] = gain["local_params"].map(lambda v: f"{v:,.0f}" if pd.notna(v) else "-")
            shown["gain_per_10k"] = gain["gain_per_10k"].map(lambda v: f"{v:+.4f}" if pd.notna(v) else "-")
        if "trustworthy" in gain:
            shown["trust"] = ["untrusted" if pd.notna(v) and not bool(v) else "" for v in gain["trustworthy"]]
        shown["resolved_vs_next"] = gain["resolved_vs_next"].map({True: "yes", False: "no"}).fillna("-")
        lines.append(
            f"\n{dataset} / {scheme} / alpha {alpha:g}: parts by accuracy gain over FedAvg (mean client accuracy "
            "over the last rounds, mean over seeds; 95% t-interval over seeds, 95% hierarchical bootstrap over "
            "seeds and clients; resolved_vs_next: the order against the next part is resolved at 95%; "
            "'all' = local only, not ranked)"
        )
        sensitivity = result.sensitivity
        partition = (sensitivity["dataset"] == dataset) & (sensitivity["scheme"] == scheme)
        note = sanity.trust_note(sensitivity[partition & (sensitivity["alpha"] == alpha)])
        if note:
            lines.append(f"WARNING: {note}")
        lines.append(shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:+.4f}"))
        friedman = gain["friedman_p"].dropna()
        if len(friedman):
            lines.append(f"Friedman test over the ranked parts (blocks: seed x client): p = {friedman.iloc[0]:.2g}")
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


def _print_validation(config: SweepConfig) -> None:
    """The validation of these settings (`fedsens validate --out SWEEP/validate`), when one is in the folder."""
    from fedsens.sensitivity.validate import validation_of

    folder = validation_of(config)
    if folder is None:
        return
    import pandas as pd

    from fedsens.commands.validate import validation_text

    typer.echo(f"\nWould these settings find it? The validation of the same settings in {folder}:")
    validation = pd.read_csv(folder / "validation.csv", keep_default_na=False, na_values=[""])
    summary = pd.read_csv(folder / "validation_summary.csv", keep_default_na=False, na_values=[""])
    typer.echo(validation_text(validation, summary))


@clean_errors
@training_options("quick")
@executor_options("cell", "quick preset: the number of cores, else 1")
def sweep(
    preset_name: str = typer.Option("quick", "--preset", help=f"{presets.names_help('quick')}. {PRESET_NOTE}"),
    dataset: str | None = typer.Option(None, help=dataset_help("Dataset (comma-separate several)")),
    data_root: str | None = typer.Option(None, help="Folder holding the dataset's files."),
    parts: list[str] | None = typer.Option(
        None,
        "--parts",
        help="An extra cell's part spec, e.g. attn,head or attn@9-11 or blocks.3 (repeat the option "
        "for several). Added to the default cells (FedAvg, each part type, local only) unless --only-parts.",
    ),
    only_parts: bool = typer.Option(False, "--only-parts", help="Run FedAvg and the --parts cells only."),
    seeds: str | None = typer.Option(None, help="Comma-separated seeds, e.g. 0,1,2 (quick preset: 0,1,2)."),
    scheme: str | None = typer.Option(
        None,
        help="Partition scheme(s): dirichlet, pathological, iid, domain. (default: dirichlet; a --preset sets its own)",
    ),
    alphas: str | None = typer.Option(
        None, help="Comma-separated Dirichlet alphas, e.g. 0.1,0.5. (default: 0.3; a --preset sets its own)"
    ),
    div_every: int | None = typer.Option(
        None, help="Record the divergence metrics every N rounds. (default: 5, the quick preset's; paper-*: 1)"
    ),
    out: str = typer.Option("runs/sweep", help="Sweep folder (finished cells in it are reused)."),
    fresh: bool = typer.Option(False, "--fresh", help="Re-run every cell instead of resuming."),
    device: str | None = typer.Option(None, help="auto (CUDA when present), cpu or cuda. (default: auto)"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    method: str | None = method_option(
        help="The method every cell trains with (fedavg by default); it must take "
        "--personalize, as the cells vary the parts kept local. `fedsens methods` lists them."
    ),
    option: list[str] | None = options_option(),
    no_verify: bool = typer.Option(False, "--no-verify", help=NO_VERIFY_HELP),
    force: bool = typer.Option(
        False, "--force", help="Run the grid even when the FedAvg reference did not learn (the ranking says so)."
    ),
    calibrate: bool = typer.Option(
        False,
        "--calibrate",
        help="Train only the FedAvg reference at increasing rounds / local epochs and print the cheapest "
        "setting at which it learns and flattens, as options for the sweep.",
    ),
    budget_minutes: float = typer.Option(30.0, "--budget-minutes", help="Time budget of --calibrate, in minutes."),
    per_block: str | None = typer.Option(
        None,
        "--per-block",
        help="Also one cell per block for these part types, e.g. attn or attn,mlp (cells attn@0, attn@1, ...).",
    ),
    mechanisms: str | None = typer.Option(
        None,
        "--mechanisms",
        help="Comma-separated mechanisms each part cell is kept local by: full (default: the whole part), lora, "
        "lora-b, bias, adapter, prompt, prompt-deep, finetune. Cells are (part, mechanism); pairs that do not "
        "apply to the model (LoRA on the convolutional embedding) are skipped with their reason.",
    ),
    split_seeds: bool = typer.Option(
        False,
        "--split-seeds",
        help="Also rank each of two disjoint halves of the seeds and report Kendall's tau between the two "
        "rankings (split_seeds.csv); on a finished --out only the tables are recomputed.",
    ),
    *,
    knobs: dict,
    execution: Execution,
) -> None:
    """Run one federated cell per (partition, seed, part kept local), then rank the parts.

    The first seed's FedAvg reference is trained and judged first: at chance the sweep stops (exit 2)
    unless --force. Writes protocol.json, sensitivity.csv, ranking.csv and the cells' tables under --out
    and prints the ranking.
    """
    from fedsens.personalize.methods.registry import parse_assignments
    from fedsens.personalize.presets import protocol_text
    from fedsens.sensitivity import executors
    from fedsens.sensitivity.sweep import DEFAULT_PARTS, protocol, run_sweep

    if only_parts and not parts:
        raise UserError("--only-parts needs at least one --parts spec")
    cell_parts = tuple(parts or ()) if only_parts else (*DEFAULT_PARTS, *(parts or ()))
    config = build_config(
        preset_name,
        run=dict(
            data_root=data_root,
            device=device,
            method=method,
            method_options=parse_assignments(option) or None,
            verify=False if no_verify else None,
            **knobs,
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
            force=force,
        ),
    )
    if per_block:
        import dataclasses

        from fedsens.sensitivity.sweep import per_block_parts

        kinds = tuple(comma_list(per_block, str, "--per-block", "attn,mlp") or ())
        config = dataclasses.replace(
            config, parts=(*config.parts, *per_block_parts(config.run.model, kinds, config.run.model_args))
        )
    if mechanisms:
        from fedsens.sensitivity.sweep import expand_mechanisms

        config, skipped = expand_mechanisms(
            config, tuple(comma_list(mechanisms, str, "--mechanisms", "full,lora") or ())
        )
        for line in skipped:
            typer.echo(f"skipped cell {line}")
    typer.echo(protocol_text(protocol(config)))
    if calibrate:
        from fedsens.sensitivity import sanity
        from fedsens.sensitivity.sweep import cell_config, grid

        reference = cell_config(config, grid(config)[0])
        found = sanity.calibrate(reference, Path(config.out), budget_minutes=budget_minutes, quiet=quiet)
        typer.echo(sanity.calibration_text(found, reference))
        return
    default_jobs = executors.cores() if preset_name == "quick" else 1
    where = execution.config(default_jobs)
    result = run_sweep(config, where)
    typer.echo(ranking_text(result))
    _print_validation(config)
    if split_seeds:
        from fedsens.sensitivity.ranking import write_seed_half_agreement

        halves = write_seed_half_agreement(result.out)
        typer.echo("\nThe ranking of two disjoint halves of the seeds (Kendall's tau, 1 = the same order):")
        typer.echo(halves.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:+.2f}"))
    typer.echo(
        f"\n{len(result.ran)} cells trained, {len(result.skipped)} reused, {len(result.failed)} failed "
        f"in {result.seconds:.0f} s; tables in {result.out}"
    )
    for name in result.failed:
        typer.echo(f"failed: {name} (see {result.out / 'cells' / name / 'error.txt'})", err=True)
    if result.failed and not result.ran and not result.skipped:
        raise typer.Exit(1)  # every cell failed: nothing in the tables to read
