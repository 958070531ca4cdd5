"""`fedsens probe`: a cheap sensitivity ranking from one FedAvg run and a short per-part fine-tuning."""

from __future__ import annotations

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
    *, sweep: str | None, run: dict, seeds: tuple | None, parts: tuple | None, probe_steps: int, out: str | None, **rest
) -> ProbeConfig:
    """With --from: the sweep's settings (and its first seed), written into SWEEP/probe unless --out says
    otherwise; without: the quick preset (the sweep's default) with every given option laid over it."""
    from fedsens.personalize import presets
    from fedsens.sensitivity.probe import PROBE_PARTS, ProbeConfig, sweep_settings

    given = {k: v for k, v in run.items() if v is not None and k != "device"}
    if sweep is not None:
        if given:
            flag = "--" + next(iter(given)).replace("_", "-")
            raise UserError(f"with --from the run settings are the sweep's; drop {flag} (or probe without --from)")
        base, sweep_seeds = sweep_settings(sweep)
        default_out, default_seeds = str(Path(sweep) / "probe"), sweep_seeds[:1]
    else:
        base, default_out, default_seeds = presets.get("quick").run_config(), "runs/probe", (0,)
    device = run.get("device")
    config_run = base.replace(**given, **({"device": device} if device else {}))
    return ProbeConfig(
        run=config_run,
        seeds=seeds or default_seeds,
        parts=parts or PROBE_PARTS,
        probe_steps=probe_steps,
        sweep=sweep,
        out=out or default_out,
        **rest,
    )


def ranking_text(result: ProbeResult) -> str:
    """The probe's ranking with its interval, its cost, and (with --from) its agreement with the sweep."""
    summary, ranking = result.summary, result.ranking
    seeds = summary["seeds"]
    unit = "seeds then clients" if len(seeds) > 1 else "clients"
    shown = ranking.assign(rank=ranking["rank"].astype("Int64"))[["rank", "part", "score", "ci_low", "ci_high"]]
    lines = [
        f"probe: mean client accuracy gain after {summary['probe_steps']} local steps of each part alone from "
        f"the FedAvg model (seeds {','.join(map(str, seeds))}; 95% bootstrap over {unit}):",
        shown.rename(columns={"score": "gain"}).to_string(index=False, na_rep="-", float_format=lambda v: f"{v:+.4f}"),
    ]
    p = ranking["friedman_p"].dropna()
    if len(p):
        lines.append(f"Friedman test over the parts (blocks: seed x client): p = {p.iloc[0]:.2g}")
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
        lines += [
            f"sweep ranking: {' > '.join(summary['sweep_order'])}; probe: {' > '.join(summary['probe_order'])}",
            f"Spearman with the sweep's accuracy ranking: probe {summary['spearman_vs_sweep']:+.2f}; "
            f"divergence metrics: {divergence or 'none'}",
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
        None, help="Comma-separated seeds, one FedAvg run each. (default: 0; --from: the sweep's first)"
    ),
    probe_steps: int = typer.Option(20, "--probe-steps", help="Local steps of each part's fine-tuning per client."),
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
        seeds=comma_list(seeds, int, "--seeds", "0"),
        parts=comma_list(parts, str, "--parts", "attn,head"),
        probe_steps=probe_steps,
        out=out,
        fresh=fresh,
        quiet=quiet,
    )
    result = run_probe(config)
    typer.echo(ranking_text(result))
    typer.echo(f"tables in {result.out}")
