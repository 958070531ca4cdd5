"""`fedsens compare`: FedPerfix and the baselines, methods x seeds on one dataset and partition."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from fedsens.commands._common import clean_errors, comma_list, overlay
from fedsens.commands._options import Execution, executor_options, training_options
from fedsens.commands.data import NO_VERIFY_HELP, dataset_help
from fedsens.commands.methods import options_option
from fedsens.personalize import presets
from fedsens.personalize.errors import UserError

if TYPE_CHECKING:  # the library is imported when the command runs, so `fedsens --help` stays quick
    from fedsens.sensitivity.compare import CompareConfig, CompareResult


def build_config(name: str, *, run: dict, compare: dict, options: dict | None = None) -> CompareConfig:
    """The preset with every explicitly given option (not None) laid over it; method options (-o) are
    added to the preset's, and each must belong to at least one compared method."""
    from fedsens.personalize import presets
    from fedsens.sensitivity.compare import check_options_apply, preset

    base = preset(name)
    overrides = presets.yield_to(base.method_overrides, run, options or {})  # the user's options win here too
    grid = {**compare, "method_options": {**base.method_options, **(options or {})}, "method_overrides": overrides}
    config = overlay(base, run=run, grid=grid)
    check_options_apply(config.methods, list(options or {}))
    return config


def _with_placed_fedperfix(config: CompareConfig, sweep_dir: Path | None, top_blocks: int | None) -> CompareConfig:
    """`--from SWEEP`: the comparison plus the row fedperfix-placed, its placement written to placement.json."""
    if sweep_dir is None:
        if top_blocks is not None:
            raise UserError("--top-blocks only makes sense with --from SWEEP_DIR")
        return config
    import dataclasses

    from fedsens.personalize import runio
    from fedsens.sensitivity.compare import PLACED_FEDPERFIX
    from fedsens.sensitivity.placement import place_fedperfix

    placement = place_fedperfix(sweep_dir, top_blocks or 1)
    typer.echo(f"{PLACED_FEDPERFIX} (--from {sweep_dir}): {placement.why}")
    options = {"blocks": ",".join(map(str, placement.blocks)), "local": placement.local}
    variants = {**config.variants, PLACED_FEDPERFIX: {"method": "fedperfix", "method_options": options}}
    Path(config.out).mkdir(parents=True, exist_ok=True)
    runio.write_json(Path(config.out) / "placement.json", {**placement.as_dict(), "sweep": str(sweep_dir)})
    return dataclasses.replace(config, variants=variants)


def _with_budget_placed(config: CompareConfig, sweep_dir: Path | None, budget: str | None):
    """`--from SWEEP --budget N`: the comparison plus the row budget-placed (FedAvg keeping the sweep's cells of
    highest predicted gain within N local parameters), its placement written to placement.json; and the placement."""
    if budget is None:
        return config, None
    if sweep_dir is None:
        raise UserError("--budget needs --from SWEEP_DIR (a folder written by `fedsens sweep --mechanisms ...`)")
    import dataclasses

    from fedsens.personalize import runio
    from fedsens.sensitivity.compare import BUDGET_PLACED
    from fedsens.sensitivity.placement import parse_budget, place_within_budget

    placement = place_within_budget(sweep_dir, parse_budget(budget))
    typer.echo(f"{BUDGET_PLACED} (--from {sweep_dir} --budget {budget}): {placement.spec!r}; {placement.why}")
    variants = {**config.variants, BUDGET_PLACED: {"method": "fedavg", "personalize": placement.spec}}
    Path(config.out).mkdir(parents=True, exist_ok=True)
    runio.write_json(Path(config.out) / "placement.json", {**placement.as_dict(), "sweep": str(sweep_dir)})
    return dataclasses.replace(config, variants=variants), placement


def summary_text(result: CompareResult) -> str:
    table = result.summary.rename(
        columns={
            "accuracy": "accuracy % (final)",
            "accuracy_best": "best round % (chosen on the test data)",
            "client_std": "client sd %",
            "comm_mb_per_round": "MB/round",
            "seconds_per_round": "s/round",
        }
    )
    columns = ["method", "accuracy % (final)", "best round % (chosen on the test data)", "client sd %"]
    columns += ["local_params", "MB/round", "s/round", "seeds"]
    if table["paper_row"].astype(bool).any():  # a paper preset: which of the paper's rows each method is
        columns.insert(1, "paper_row")
    shown = table[columns]
    return shown.to_string(index=False, float_format=lambda v: f"{v:.2f}")


@clean_errors
@training_options("default")
@executor_options("run", "default 1")
def compare(
    preset_name: str = typer.Option(
        "default",
        "--preset",
        help=f"{presets.names_help('default')}; default is digits on the CPU. Options you give override the preset.",
    ),
    methods: str | None = typer.Option(
        None, help="Comma-separated methods (default: all eleven), e.g. fedavg,fedper,fedperfix."
    ),
    seeds: str | None = typer.Option(None, help="Comma-separated seeds, e.g. 0,1,2. (default: 0; paper-*: 1)"),
    dataset: str | None = typer.Option(None, help=dataset_help()),
    data_root: str | None = typer.Option(None, help="Folder holding the dataset's files."),
    alpha: float | None = typer.Option(
        None, help="Dirichlet concentration, small = strong label skew. (default: 0.3; a --preset sets its own)"
    ),
    scheme: str | None = typer.Option(
        None,
        "--scheme",
        "--partition",
        help="Partition scheme: dirichlet, pathological, iid, domain (a sweep's, to check its --budget placement). "
        "(default: dirichlet; a --preset sets its own)",
    ),
    out: str | None = typer.Option(
        None,
        help="Comparison folder, finished runs in it are reused. (default: runs/compare; paper-*: runs/compare-DATA)",
    ),
    fresh: bool = typer.Option(False, "--fresh", help="Re-run every method instead of resuming."),
    device: str | None = typer.Option(None, help="auto (CUDA when present), cpu or cuda. (default: auto)"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    option: list[str] | None = options_option(
        "A method option KEY=VALUE (repeatable), given to every compared method that has KEY, e.g. -o scale=1.0."
    ),
    no_verify: bool = typer.Option(False, "--no-verify", help=NO_VERIFY_HELP),
    force: bool = typer.Option(
        False, "--force", help="Run the methods even when the FedAvg reference (first seed) did not learn."
    ),
    sweep_dir: Path | None = typer.Option(
        None,
        "--from",
        help="A finished sweep folder: add the row fedperfix-placed, FedPerfix with its adapters and extra local "
        "parts placed by the sweep's ranking (recorded in placement.json).",
    ),
    top_blocks: int | None = typer.Option(
        None, "--top-blocks", help="With --from: adapters in the K blocks the sweep ranks most sensitive (default 1)."
    ),
    budget: str | None = typer.Option(
        None,
        "--budget",
        help="With --from: add the row budget-placed, FedAvg keeping the sweep's resolved (part, mechanism) cells of "
        "highest predicted gain within this many local parameters (e.g. 20k), and print its predicted beside its "
        "measured gain over FedAvg. Methods default to fedavg,fedperfix; fedperfix-placed only with --top-blocks.",
    ),
    *,
    knobs: dict,
    execution: Execution,
) -> None:
    """Run each method for each seed (same partition and initial weights within a seed), then tabulate.

    Writes comparison.csv, summary.csv and the runs' rounds/metrics tables under --out and prints
    the summary: final-round mean client accuracy (mean ± sd over seeds) and each method's costs.
    """
    from fedsens.personalize.methods.registry import parse_assignments
    from fedsens.personalize.presets import protocol_text
    from fedsens.sensitivity.compare import protocol, run_compare

    config = build_config(
        preset_name,
        run=dict(
            dataset=dataset,
            data_root=data_root,
            alpha=alpha,
            scheme=scheme,
            device=device,
            verify=False if no_verify else None,
            **knobs,
        ),
        compare=dict(
            methods=comma_list(methods, str, "--methods", "fedavg,fedperfix")
            or (("fedavg", "fedperfix") if budget is not None else None),
            seeds=comma_list(seeds, int, "--seeds", "0,1,2"),
            out=out,
            fresh=fresh,
            quiet=quiet,
            force=force,
        ),
        options=parse_assignments(option),
    )
    if budget is None or top_blocks is not None:
        config = _with_placed_fedperfix(config, sweep_dir, top_blocks)
    config, budgeted = _with_budget_placed(config, sweep_dir, budget)
    typer.echo(protocol_text(protocol(config)))
    where = execution.config(1)
    result = run_compare(config, where)
    typer.echo(
        f"\n{config.run.dataset}, {config.run.model}, {config.run.clients} clients, {config.run.rounds} rounds, "
        f"{config.run.eval_protocol} evaluation; best round chosen on the test data:"
    )
    typer.echo(summary_text(result))
    if budgeted is not None:
        from fedsens.sensitivity.compare import BUDGET_PLACED, measured_gain

        measured = measured_gain(result.comparison, BUDGET_PLACED)
        typer.echo(
            f"\n{BUDGET_PLACED} = {budgeted.spec} ({budgeted.local_params:,.0f} local parameters, budget "
            f"{budgeted.budget:,}): predicted gain over FedAvg {budgeted.predicted_gain:+.4f} (the sweep's cells), "
            f"measured {measured:+.4f} (final-round mean client accuracy, paired by seed)"
        )
    typer.echo(
        f"\n{len(result.ran)} runs trained, {len(result.skipped)} reused, {len(result.failed)} failed "
        f"in {result.seconds:.0f} s; tables in {result.out}"
    )
    for name in result.failed:
        typer.echo(f"failed: {name} (see {result.out / 'runs' / name / 'error.txt'})", err=True)
    if result.failed and not result.ran and not result.skipped:
        raise typer.Exit(1)  # every run failed: nothing in the tables to read
