"""`fedsens probe`: a cheap sensitivity ranking from one FedAvg run and a short per-part fine-tuning."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from fedsens.commands._common import clean_errors, comma_list
from fedsens.commands._options import training_options
from fedsens.commands.data import dataset_help
from fedsens.personalize.errors import UserError

if TYPE_CHECKING:  # the library is imported when the command runs, so `fedsens --help` stays quick
    from fedsens.sensitivity.probe import ProbeConfig, ProbeResult


def build_config(
    *,
    sweep: str | None,
    run: dict,
    seeds: str | None,
    parts: tuple | None,
    probe_steps: int,
    out: str | None,
    **rest,
) -> ProbeConfig:
    """With --from: the sweep's settings (and its first seed, or all of its seeds with `--seeds all`),
    written into SWEEP/probe unless --out says otherwise; without: the quick preset (the sweep's default)
    with every given option laid over it."""
    from fedsens.personalize import presets
    from fedsens.sensitivity.probe import PROBE_PARTS, ProbeConfig, sweep_settings
    from fedsens.sensitivity.sweep import preset as sweep_preset

    given = {k: v for k, v in run.items() if v is not None and k != "device"}
    if sweep is not None:
        if given:
            flag = "--" + next(iter(given)).replace("_", "-")
            raise UserError(f"with --from the run settings are the sweep's; drop {flag} (or probe without --from)")
        base, all_seeds = sweep_settings(sweep)
        default_out, default_seeds = str(Path(sweep) / "probe"), all_seeds[:1]
    else:
        base, default_out, default_seeds = presets.get("quick").run_config(), "runs/probe", (0,)
        all_seeds = sweep_preset("quick").seeds
    device = run.get("device")
    config_run = base.replace(**given, **({"device": device} if device else {}))
    chosen = all_seeds if seeds == "all" else comma_list(seeds, int, "--seeds", "0,1,2 or all")
    return ProbeConfig(
        run=config_run,
        seeds=chosen or default_seeds,
        parts=parts or PROBE_PARTS,
        probe_steps=probe_steps,
        sweep=sweep,
        out=out or default_out,
        **rest,
    )


WHAT_IS_MEASURED = {
    "finetune": "mean client accuracy gain after {steps} local steps of each part alone from the FedAvg model",
    "fork": "mean client accuracy over {rounds} federated rounds continued from the FedAvg model with each part "
    "kept local, minus FedAvg continued",
    "disagreement": "mean over clients of 1 - cosine(the client's gradient of the part, the clients' mean "
    "gradient), over {steps} batches at the FedAvg model",
}


def ranking_text(result: ProbeResult) -> str:
    """The probe's scores with their intervals and, only when its parts are distinguishable, its order; its
    cost and (with --from) its agreement with the sweep."""
    summary, ranking = result.summary, result.ranking
    seeds = summary["seeds"]
    unit = "seeds then clients" if len(seeds) > 1 else "clients"
    what = WHAT_IS_MEASURED[summary["variant"]].format(steps=summary["probe_steps"], rounds=summary["fork_rounds"])
    columns = ["rank", "part", "score", "ci_low", "ci_high", "resolved_vs_next"]
    shown = ranking.assign(
        rank=ranking["rank"].astype("Int64"),
        resolved_vs_next=ranking["resolved_vs_next"].map(lambda v: {"True": "yes", "False": "no"}.get(str(v), "-")),
    )[columns]
    if not summary["distinguishable"]:  # no order: the parts in the order they were probed
        shown = (
            shown.drop(columns=["rank", "resolved_vs_next"]).set_index("part").reindex(summary["parts"]).reset_index()
        )
    lines = [
        f"probe ({summary['variant']}): {what} (seeds {','.join(map(str, seeds))}; 95% bootstrap over {unit}; "
        "resolved_vs_next: the paired difference with the next part excludes zero):",
        shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:+.4f}"),
    ]
    if math.isfinite(summary["friedman_p"]):
        lines.append(f"Friedman test over the parts (blocks: seed x client): p = {summary['friedman_p']:.2g}")
    if summary["distinguishable"]:
        lines.append(f"probe order: {' > '.join(summary['probe_order'])}")
    else:
        lines.append(f"NO ORDER: the probe cannot tell the parts apart ({summary['why_not']})")
    reused = " (reused from the sweep)" if summary["fedavg_reused"] else ""
    lines.append(
        f"cost: {summary['seconds']:.0f} s = FedAvg {summary['fedavg_seconds']:.0f} s{reused} "
        f"+ probe {summary['probe_seconds']:.0f} s"
    )
    if "spearman_vs_sweep" in summary:
        divergence = ", ".join(
            f"{metric} {value:+.2f}" if value is not None else f"{metric} n/a"
            for metric, value in summary["divergence_spearman"].items()
        )
        same = "the same top part" if summary["same_top_part"] else "NOT the sweep's top part"
        lines += [
            f"sweep ranking: {' > '.join(summary['sweep_order'])}",
            f"measured agreement with this sweep: Spearman {summary['spearman_vs_sweep']:+.2f}, {same} "
            f"(the probe's scores, ordered or not); divergence metrics: {divergence or 'none'}",
            f"cost as a fraction of the sweep's ({summary['sweep_seconds']:.0f} s of cell rounds): "
            f"{summary['cost_fraction']:.3f} "
            f"(the probe alone, FedAvg already run: {summary['probe_only_fraction']:.4f})",
        ]
    return "\n".join(lines)


@clean_errors
@training_options("quick")
def probe(
    sweep: str | None = typer.Option(
        None,
        "--from",
        help="A finished sweep folder: use its settings, reuse its FedAvg cells, and compare the probe's ranking "
        "with the sweep's (written into SWEEP/probe unless --out).",
    ),
    seeds: str | None = typer.Option(
        None,
        help="Comma-separated seeds, one FedAvg run each, or `all` (the sweep's seeds). "
        "(default: 0; --from: the sweep's first)",
    ),
    variant: str = typer.Option(
        "finetune",
        "--variant",
        help="finetune: each part alone fine-tuned for --probe-steps local steps; fork: the run continued for "
        "--fork-rounds federated rounds with each part kept local, against FedAvg continued; disagreement: "
        "1 - cosine of each client's gradient of the part with the clients' mean, over --probe-steps batches.",
    ),
    probe_steps: int = typer.Option(
        100, "--probe-steps", "--steps", help="Local steps (finetune) or gradient batches (disagreement) per client."
    ),
    fork_rounds: int = typer.Option(3, "--fork-rounds", help="Federated rounds of each fork (--variant fork)."),
    parts: str | None = typer.Option(None, help="Part types to probe (default: embed,attn,mlp,norm,head)."),
    dataset: str | None = typer.Option(None, help=dataset_help()),
    alpha: float | None = typer.Option(None, help="Dirichlet concentration. (default: 0.3)"),
    out: str | None = typer.Option(None, help="Probe folder. (default: runs/probe; --from: SWEEP/probe)"),
    fresh: bool = typer.Option(False, "--fresh", help="Re-train the probe's own FedAvg runs instead of resuming."),
    device: str | None = typer.Option(None, help="auto (CUDA when present), cpu or cuda. (default: auto)"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    *,
    knobs: dict,
) -> None:
    """Rank the part types by how much fine-tuning each alone helps the clients after FedAvg.

    Writes probe.csv (per seed, client and part: accuracy before, after, gain), probe_ranking.csv and
    probe.json, and prints the ranking, its cost and, with --from, its agreement with the sweep.
    """
    from fedsens.sensitivity.probe import run_probe

    config = build_config(
        sweep=sweep,
        run=dict(dataset=dataset, alpha=alpha, device=device, **knobs),
        seeds=seeds,
        parts=comma_list(parts, str, "--parts", "attn,head"),
        variant=variant,
        probe_steps=probe_steps,
        fork_rounds=fork_rounds,
        out=out,
        fresh=fresh,
        quiet=quiet,
    )
    result = run_probe(config)
    typer.echo(ranking_text(result))
    typer.echo(f"tables in {result.out}")
