"""`build_report`: a run, sweep, comparison or bench folder -> figures and one self-contained HTML report.

It reads the folder's CSV / JSON tables only (never trains), makes every figure those tables allow,
saves each as PNG and SVG under DIR/report/, and writes DIR/report/index.html and report.md.
A missing table leaves its figures out with a note saying which file was missing.
"""

from __future__ import annotations

import io
import json
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from tqdm import tqdm

from fedsens.personalize import runio
from fedsens.personalize.schema import PROBE_METRIC
from fedsens.reports import figures
from fedsens.reports import validation as validation_report
from fedsens.reports.bench import BENCH_FIGURE_NAMES, bench_failures, bench_headline, bench_tables
from fedsens.reports.render import Block, FigureBlock, Heading, Note, Paragraph, Table, render_html, render_markdown
from fedsens.reports.tables import (
    CONFIG_FILES,
    FolderTables,
    bench_rows,
    by_partition,
    detect,
    fedavg_divergence,
    final_client_accuracy,
    gain_ranking,
    headline_protocol,
    ok_rows,
    partition_counts,
    read_folder,
    untrained_references,
    untrusted_parts,
)

__all__ = ["build_report", "detect", "plan_figures"]

PNG_DPI = 110  # sharp on screen while keeping index.html well under a few MB
FIGURE_NAMES = (
    "sensitivity",
    "rank_agreement",
    "critical_difference",
    "block_gains",
    "divergence_heatmap",
    "divergence_rounds",
    "training_curves",
    "fairness",
    "cost",
    "partition",
)


# The kinds whose key table comes before the figures: it is the result, the figures illustrate it.
TABLES_FIRST = ("comparison", "bench")


@dataclass(frozen=True)
class PlannedFigure:
    name: str  # file stem under DIR/report/
    caption: str  # one line: what the figure shows
    draw: Callable[[], Figure]


def build_report(folder: str | Path, *, open_browser: bool = False, quiet: bool = False) -> Path:
    """Write DIR/report/index.html (+ report.md, PNG and SVG figures) and return the HTML's path."""
    tables = read_folder(folder)
    planned, notes = plan_figures(tables)
    out = tables.folder / "report"
    out.mkdir(exist_ok=True)
    for name in (
        *FIGURE_NAMES,
        *BENCH_FIGURE_NAMES,
        *validation_report.VALIDATION_FIGURE_NAMES,
    ):  # a figure whose table has gone must not linger
        for stale in [*out.glob(f"{name}*.png"), *out.glob(f"{name}*.svg")]:
            stale.unlink()
    figure_blocks: list[Block] = [_save(plan, out) for plan in tqdm(planned, desc="report figures", disable=quiet)]
    blocks: list[Block] = [
        *headline(tables),
        *[Note(f"warning: {problem}") for problem in tables.problems],
        *[Note(note) for note in notes],
        *(key_tables(tables) if tables.kind in TABLES_FIRST else []),
        Heading("Figures"),
        *(figure_blocks or [Note("no figure could be made from this folder's tables")]),
        *(key_tables(tables) if tables.kind not in TABLES_FIRST else []),
        *more_tables(tables),
        *configuration(tables),
    ]
    title = f"fedsens {tables.kind} report: {tables.folder.resolve().name}"
    subtitle = f"{tables.folder.resolve()} · tables read: {', '.join(sorted(f'{n}.csv' for n in tables.frames))}"
    index = out / "index.html"
    runio.write_text(index, render_html(title, subtitle, blocks))
    runio.write_text(out / "report.md", render_markdown(title, subtitle, blocks))
    if open_browser:
        webbrowser.open(index.resolve().as_uri())
    return index


def _save(plan: PlannedFigure, out: Path) -> FigureBlock:
    figure = plan.draw()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PNG_DPI)
    runio.write_bytes(out / f"{plan.name}.png", buffer.getvalue())
    runio.replace_atomically(out / f"{plan.name}.svg", lambda tmp: figure.savefig(tmp, format="svg"))
    return FigureBlock(plan.name, plan.caption, buffer.getvalue())


def configuration(tables: FolderTables) -> list[Block]:
    """The folder's configuration file as a table; a bench folder has none (bench.csv names each configuration)."""
    if tables.kind not in CONFIG_FILES:
        return []
    return [
        Heading(f"Configuration ({CONFIG_FILES[tables.kind]})"),
        Table("settings", config_table(tables.config)) if tables.config else Note("no configuration file found"),
    ]


def plan_figures(tables: FolderTables) -> tuple[list[PlannedFigure], list[str]]:
    """The figures this folder's tables allow, in report order, and a note for each one left out."""
    notes: list[str] = []

    def need(available: bool, missing: str, figures_left_out: str) -> bool:
        if not available:
            notes.append(f"{missing} not found in {tables.folder.name}: {figures_left_out} left out.")
        return available

    if tables.kind == "bench":
        notes.extend(bench_failures(tables.frames.get("bench")))
        return _bench_figures(tables.frames, need), notes
    if tables.kind == "validation":
        return _validation_figures(tables.frames, need), notes
    planned = [
        *(_ranking_figures(tables.frames, need) if tables.kind == "sweep" else []),
        *(_validation_figures(tables.frames, need) if "validation" in tables.frames else []),
        *(_divergence_figures(tables.frames, need) if tables.kind != "comparison" else []),
        *_accuracy_figures(tables, need),
        *_partition_figure(tables, need),
    ]
    return planned, notes


def _ranking_figures(frames: dict[str, pd.DataFrame], need) -> list[PlannedFigure]:
    ranking = frames.get("ranking")
    gains = gain_ranking(ranking) if ranking is not None else None
    if not need(gains is not None and len(gains) > 0, "ranking.csv (gain_vs_fedavg rows)", "the sensitivity bars"):
        return []
    planned = []
    missed = validation_report.missed_effects(frames.get("validation_metrics"))
    for label, rows in by_partition(ranking):
        suffix, where = (f"-{runio.slug(label)}", f" ({label})") if label else ("", "")
        planned.append(
            PlannedFigure(
                f"sensitivity{suffix}",
                f"Accuracy gain over FedAvg when each part is kept local and the rest aggregated{where}: mean over "
                "seeds with its confidence interval across seeds; rank 1 (top) gains most from personalization.",
                partial(figures.plot_sensitivity, rows),
            )
        )
        gains_rows = gain_ranking(rows)
        if gains_rows["part"].astype(str).str.contains("@").any():
            planned.append(
                PlannedFigure(
                    f"block_gains{suffix}",
                    f"Accuracy gain over FedAvg when one block's part is kept local{where} (--per-block cells): "
                    "mean over seeds, band = t-interval across seeds.",
                    partial(figures.plot_block_gains, rows),
                )
            )
        if "mechanism" in gains_rows and gains_rows["mechanism"].dropna().nunique() > 1:
            planned.append(
                PlannedFigure(
                    f"gain_cost{suffix}",
                    f"Each (part, mechanism) cell's accuracy gain over FedAvg against the parameters it keeps on each "
                    f"client, log scale{where} (`fedsens sweep --mechanisms`); bars: the bootstrap interval; ringed "
                    "and joined: the cells no other cell beats on both gain and cost (the Pareto front).",
                    partial(figures.plot_gain_cost, rows),
                )
            )
        if "mean_rank" in gains_rows and gains_rows["mean_rank"].notna().sum() >= 2:
            planned.append(
                PlannedFigure(
                    f"critical_difference{suffix}",
                    f"Each ranked part at its mean rank over (seed, client) blocks{where}; a bar joins neighbours in "
                    "the ranking whose order the hierarchical bootstrap of their paired difference does not resolve "
                    "at 95%.",
                    partial(figures.plot_critical_difference, rows),
                )
            )
        if need(
            (rows["metric"] != "gain_vs_fedavg").any(),
            f"divergence rows in ranking.csv{where}",
            "the divergence-vs-accuracy ranking figure",
        ):
            planned.append(
                PlannedFigure(
                    f"rank_agreement{suffix}",
                    f"Each divergence metric's ranking of the parts (FedAvg cell{where}), and the probe's when "
                    "`fedsens probe --from` ran on this sweep (probe_gain), against their ranking by accuracy gain; "
                    "points on the dashed diagonal agree, the legend gives Spearman's rho"
                    + (
                        " and, from the validation of these settings, the planted effects whose part a metric does "
                        "not point at (such a metric cannot predict the sweep)."
                        if missed
                        else "."
                    ),
                    partial(figures.plot_rank_agreement, rows, missed=missed),
                )
            )
    return planned


def _divergence_figures(frames: dict[str, pd.DataFrame], need) -> list[PlannedFigure]:
    if not need("divergence" in frames, "divergence.csv", "the divergence figures"):
        return []
    divergence = fedavg_divergence(frames["divergence"])
    where = " in the FedAvg cells" if "local_part" in divergence.columns else ""
    return [
        PlannedFigure(
            "divergence_heatmap",
            f"How far the clients' models pull apart, per block (rows) and part (columns){where}, "
            "averaged over rounds; one panel per divergence metric.",
            partial(figures.plot_divergence_heatmap, divergence),
        ),
        PlannedFigure(
            "divergence_rounds",
            f"Each part's divergence metric per round (mean over its blocks){where}; one panel per metric.",
            partial(figures.plot_divergence_rounds, divergence),
        ),
    ]


def _accuracy_figures(tables: FolderTables, need) -> list[PlannedFigure]:
    """Training curves, fairness and cost: one line / box / point per method or kept-local part."""
    frames, planned = tables.frames, []
    what = {"run": "the run", "sweep": "each kept-local part (none = FedAvg)", "comparison": "each method"}[tables.kind]
    evaluated = "rounds" in frames and frames["rounds"]["acc_mean"].notna().any()
    if need(evaluated, "rounds.csv with an evaluated round", "the training curves"):
        rounds = frames["rounds"]
        planned.append(
            PlannedFigure(
                "training_curves",
                f"Mean client test accuracy per round for {what}{_over_seeds(rounds)}; "
                "the band is ± one standard deviation across clients.",
                partial(figures.plot_training_curves, rounds),
            )
        )
    protocol = headline_protocol(frames)
    final = final_client_accuracy(frames["metrics"], protocol) if "metrics" in frames else None
    if need(final is not None and len(final) > 0, "metrics.csv with test rows", "the fairness figure"):
        planned.append(
            PlannedFigure(
                "fairness",
                f"Each client's test accuracy at the last evaluated round for {what}{_over_seeds(final, 'pooled')}; "
                "the red diamond marks the worst 10% of clients (10th percentile).",
                partial(figures.plot_fairness, final),
            )
        )
    cost_table = {"sweep": "sensitivity", "comparison": "comparison"}.get(tables.kind)
    if cost_table is None:  # a single run is one point: nothing to compare
        return planned
    cost = ok_rows(frames[cost_table]).dropna(subset=["acc_mean"]) if cost_table in frames else None
    if need(cost is not None and len(cost) > 0, f"{cost_table}.csv with a finished row", "the cost figure"):
        planned.append(
            PlannedFigure(
                "cost",
                f"Mean client accuracy against bytes communicated per round (left) and parameters kept local per "
                f"client (right), for {what}; error bars are ± std over seeds.",
                partial(figures.plot_cost, cost),
            )
        )
    return planned


def _partition_figure(tables: FolderTables, need) -> list[PlannedFigure]:
    partition = tables.partition
    if not need(partition is not None, "partition.json", "the partition heat map") or partition is None:
        return []
    counts = partition_counts(partition)
    domains = " and domain" if (counts["axis"] == "domain").any() else ""
    return [
        PlannedFigure(
            "partition",
            f"Samples each client holds per class{domains} (train + test), from {tables.partition_source}"
            f"{_partition_params(partition)}.",
            partial(figures.plot_partition, counts),
        )
    ]


def _validation_figures(frames: dict[str, pd.DataFrame], need) -> list[PlannedFigure]:
    validation = frames.get("validation")
    if not need(validation is not None and len(validation) > 0, "validation.csv", "the validation figures"):
        return []
    planned = [
        PlannedFigure(
            "validation",
            "The sweep's settings on planted datasets with known answers: per effect, the top part's tail gain over "
            "FedAvg at each strength (share of domains changed) with its 95% hierarchical-bootstrap interval; "
            "filled = the planted part ranked first, resolved from the next and above zero.",
            partial(validation_report.plot_validation, validation),
        )
    ]
    metrics = frames.get("validation_metrics")
    if metrics is not None and (metrics["expected"].fillna("") != "").any():
        planned.append(
            PlannedFigure(
                "validation_metrics",
                "Each divergence metric's most sensitive part in the FedAvg cells of each planted dataset: green where "
                "it is the planted part, red where the metric points elsewhere.",
                partial(validation_report.plot_metric_validation, metrics),
            )
        )
    return planned


def _bench_figures(frames: dict[str, pd.DataFrame], need) -> list[PlannedFigure]:
    measured = bench_rows(frames["bench"])[0] if "bench" in frames else None
    if not need(measured is not None and len(measured) > 0, "bench.csv with a measured row", "the bench figures"):
        return []
    return [
        PlannedFigure(
            "bench_ratios",
            "Training, evaluation and whole-round time per round over the bare compute (a plain PyTorch loop doing "
            "the same steps with one model; dashed line = 1.0) for each configuration; hatched bars are the "
            "PFLlib-style reference loop, numbers the whole round's ratio.",
            partial(figures.plot_bench_ratios, measured),
        ),
        PlannedFigure(
            "bench_memory",
            "Peak RSS against the bytes of the local tensors (MB = 2^20 bytes), one point per configuration and "
            "loop, labelled by client count; on the dashed line memory grows by exactly the local state.",
            partial(figures.plot_bench_memory, measured),
        ),
    ]


def _over_seeds(table: pd.DataFrame, verb: str = "averaged") -> str:
    seeds = table["seed"].nunique() if "seed" in table.columns else 1
    return f", {verb} over {seeds} seeds" if seeds > 1 else ""


def _partition_params(partition: dict) -> str:
    params = partition.get("params") or {}
    shown = [f"{key}={params[key]}" for key in ("scheme", "alpha", "num_clients", "seed") if key in params]
    return f" ({', '.join(shown)})" if shown else ""


def headline(tables: FolderTables) -> list[Block]:
    """The one or two sentences a reader should see first, and the evaluation protocol they use."""
    frames = tables.frames
    if tables.kind == "sweep":
        blocks = _sweep_headline(frames)
    elif tables.kind == "comparison":
        blocks = _comparison_headline(frames["comparison"])
    elif tables.kind == "bench":
        blocks = bench_headline(frames.get("bench"))
    elif tables.kind == "validation":
        blocks = validation_report.validation_headline(frames.get("validation_summary"))
    else:
        blocks = _run_headline(tables.summary, frames.get("rounds"))
    protocol = headline_protocol(frames)
    if protocol:
        blocks.append(Paragraph(f"Accuracies use the {protocol} evaluation protocol ({_PROTOCOLS.get(protocol, '')})."))
    return blocks


_PROTOCOLS = {
    "after-aggregation": "every client tested with the round's aggregated model plus its local parts",
    "paper": "the public FedPerfix code's timing: each participant tested right after its local training, "
    "before aggregation, every other client with the start-of-round model plus its local parts",
}


def _sweep_headline(frames: dict[str, pd.DataFrame]) -> list[Block]:
    if "ranking" not in frames or not len(gain_ranking(frames["ranking"])):
        return [Paragraph("This sweep has no ranking.csv yet: re-run `fedsens sweep` on it to finish it.", lead=True)]
    blocks: list[Block] = []
    untrained = untrained_references(frames.get("sensitivity"))
    for label, rows in by_partition(frames["ranking"]):
        gains = gain_ranking(rows)
        ranked = gains[gains["rank"].notna()]
        if label in untrained:
            blocks.append(Paragraph(f"{label + ': ' if label else ''}{untrained[label]}", lead=True))
            continue
        if not len(ranked):
            blocks.append(Paragraph(f"{label + ': ' if label else ''}no part could be ranked yet.", lead=True))
            continue
        top = ranked.iloc[0]
        interval = (
            f" (CI {top['ci_low']:+.4f} to {top['ci_high']:+.4f})"
            if pd.notna(top["ci_low"])
            else " (one seed: no interval)"
        )
        text = (
            f"{label + ': ' if label else ''}Most sensitive part: {top['part']} — keeping it local changes mean "
            f"client accuracy by {top['score']:+.4f} over FedAvg{interval}. "
            f"Ranking: {' > '.join(ranked['part'].astype(str))}."
        )
        unranked = gains[gains["rank"].isna() & gains["score"].notna()]
        text += "".join(f" Not ranked: {row['part']} {row['score']:+.4f}." for _, row in unranked.iterrows())
        untrusted = untrusted_parts(gains)
        if untrusted:
            text += f" Not trustworthy (a cell or its FedAvg reference at chance): {', '.join(untrusted)}."
        blocks.append(Paragraph(text, lead=True))
        divergence = rows[rows["metric"] != "gain_vs_fedavg"]
        if len(divergence) and "spearman_vs_gain" in divergence.columns:
            rho = divergence.groupby("metric", sort=False)["spearman_vs_gain"].first()
            pairs = ", ".join(
                f"{metric} {value:+.2f}" if pd.notna(value) else f"{metric} n/a" for metric, value in rho.items()
            )
            blocks.append(
                Paragraph(
                    f"Spearman correlation of each divergence (or probe) ranking with the accuracy ranking: {pairs}."
                )
            )
        probe = rows[rows["metric"] == PROBE_METRIC]
        if len(probe):
            blocks.append(Paragraph(probe_agreement_text(probe, ranked)))
    return blocks


def probe_agreement_text(probe: pd.DataFrame, ranked: pd.DataFrame) -> str:
    """What the probe (`fedsens probe --from` this sweep) measured against the sweep, and whether its own
    parts are distinguishable: an order only when Friedman's p < 0.05 and its top part is resolved."""
    probe = probe.sort_values("rank")
    top = probe.iloc[0]
    rho = probe["spearman_vs_gain"].dropna()
    same = str(top["part"]) == str(ranked.iloc[0]["part"])
    text = (
        f"The probe against this sweep: Spearman {rho.iloc[0]:+.2f} with the accuracy ranking"
        if len(rho)
        else "The probe against this sweep: no Spearman (fewer than three common parts)"
    )
    sweep_top = str(ranked.iloc[0]["part"])
    text += f"; its top part {top['part']} is " + ("the sweep's." if same else f"not the sweep's ({sweep_top}).")
    friedman_p = probe["friedman_p"].dropna()
    p = float(friedman_p.iloc[0]) if len(friedman_p) else float("nan")
    resolved = str(top.get("resolved_vs_next")) == "True"
    if p < 0.05 and resolved:
        return text + f" Its own parts are distinguishable (Friedman p = {p:.2g}, top part resolved from the next)."
    return text + (
        f" Its own parts are NOT distinguishable (Friedman p = {p:.2g}"
        f"{'' if resolved else ', top part not resolved from the next'}): read no order from it."
    )


def _comparison_headline(comparison: pd.DataFrame) -> list[Block]:
    stats = ok_rows(comparison).groupby("method", sort=False)["acc_mean"].agg(["mean", "std", "count"])
    stats = stats.dropna(subset=["mean"]).sort_values("mean", ascending=False)
    if not len(stats):
        return [Paragraph("No method has finished yet: run `fedsens compare` again to finish it.", lead=True)]
    best, row = stats.index[0], stats.iloc[0]
    spread = f" ± {row['std']:.4f}" if pd.notna(row["std"]) else ""
    others = "; ".join(f"{method} {other['mean']:.4f}" for method, other in stats.iloc[1:].iterrows())
    text = f"Best final-round mean client accuracy: {best} {row['mean']:.4f}{spread} over {int(row['count'])} seed(s)"
    text += f" (then {others})." if others else "."
    if "acc_best" in comparison.columns:
        best_rounds = ok_rows(comparison).groupby("method", sort=False)["acc_best"].mean().dropna()
        shown = "; ".join(f"{method} {value:.4f}" for method, value in best_rounds.sort_values(ascending=False).items())
        text += f" Best round per method (chosen on the test data, as the paper reports): {shown}."
    return [Paragraph(text, lead=True)]


def _run_headline(summary: dict | None, rounds: pd.DataFrame | None) -> list[Block]:
    summary = summary or {}
    if summary.get("status") == "diverged":
        where = summary.get("diverged", {})
        text = (
            f"Status: diverged. Client {where.get('client', '?')} hit a non-finite loss ({where.get('loss', '?')}) "
            f"in round {where.get('round', '?')}; the run stopped there and the tables and figures show the "
            f"{summary.get('rounds', '?')} rounds before it. Lower the learning rate (--lr) and run it again."
        )
        return [Paragraph(text, lead=True), *_run_headline({**summary, "status": "stopped"}, rounds)[:1]]
    if summary.get("acc_last") is not None:
        text = f"Final mean client accuracy {summary['acc_last']:.4f}"
        if summary.get("acc_best") is not None:
            text += (
                f" (best {summary['acc_best']:.4f} at round {summary.get('round_best', '?')}, chosen on the test data)"
            )
        text += f" after {summary.get('rounds', '?')} rounds"
        if summary.get("local_params") is not None:
            text += f"; {int(summary['local_params']):,} parameters kept local per client"
        if summary.get("comm_bytes_per_round") is not None:
            text += f", {summary['comm_bytes_per_round'] / 1e6:.3f} MB communicated per round"
        return [Paragraph(text + ".", lead=True)]
    if rounds is not None and rounds["acc_mean"].notna().any():
        last = rounds.dropna(subset=["acc_mean"]).iloc[-1]
        return [
            Paragraph(
                f"Mean client accuracy {last['acc_mean']:.4f} at round {int(last['round'])} "
                "(summary.json has no final accuracy yet).",
                lead=True,
            )
        ]
    return [Paragraph("This run has no evaluated round yet.", lead=True)]


def key_tables(tables: FolderTables) -> list[Block]:
    """The key tables: the ranking (after the figures), the comparison and the bench (before them), the run's
    summary."""
    frames = tables.frames
    blocks: list[Block] = []
    if tables.kind == "sweep" and "ranking" in frames:
        blocks.append(Heading("Ranking"))
        for label, rows in by_partition(frames["ranking"]):
            blocks.extend(_ranking_tables(rows, f" ({label})" if label else ""))
    if tables.kind == "comparison":
        blocks.append(Heading("Comparison"))
        if "summary" in frames:
            blocks.append(Table("mean ± std over seeds (summary.csv)", frames["summary"]))
        blocks.append(Table("one row per method and seed (comparison.csv)", frames["comparison"], collapsed=True))
    if tables.kind == "bench":
        blocks.extend(bench_tables(frames.get("bench")))
    if "validation" in frames:  # a validation folder, or a sweep holding the validation of its settings
        blocks.extend(validation_report.validation_tables(frames))
    if tables.kind == "run":
        blocks.append(Heading("Result"))
        if tables.summary:
            blocks.append(Table("summary.json", config_table(tables.summary)))
        if "parts" in frames:
            blocks.append(Table("parameters per part (parts.csv)", parts_summary(frames["parts"])))
    return blocks


def _ranking_tables(ranking: pd.DataFrame, where: str) -> list[Block]:
    gains = gain_ranking(ranking)
    columns = [c for c in ("rank", "part", "score", "ci_low", "ci_high") if c in gains.columns]
    blocks: list[Block] = [Table(f"by accuracy gain over FedAvg{where} (score = mean gain over seeds)", gains[columns])]
    divergence = ranking[ranking["metric"] != "gain_vs_fedavg"]
    if len(divergence):
        ranks = divergence.pivot_table(index="part", columns="metric", values="rank", sort=False)
        ranks = ranks.reindex([p for p in gains["part"] if p in ranks.index]).reset_index()
        ranks.columns.name = None
        blocks.append(Table(f"by each divergence metric in the FedAvg cell{where} (rank)", ranks))
    return blocks


def more_tables(tables: FolderTables) -> list[Block]:
    """Full tables, collapsed, below the figures."""
    frames = tables.frames
    blocks: list[Block] = [Heading("Tables")]
    if tables.kind == "sweep" and "sensitivity" in frames:
        blocks.append(Table("sensitivity.csv (one row per cell)", frames["sensitivity"], collapsed=True))
    if tables.kind == "sweep" and "ranking" in frames:
        blocks.append(Table("ranking.csv", frames["ranking"], collapsed=True))
    if "rounds" in frames:
        blocks.append(Table("rounds.csv", frames["rounds"], collapsed=True))
    return blocks if len(blocks) > 1 else []


def parts_summary(parts: pd.DataFrame) -> pd.DataFrame:
    """parts.csv summed per part type and local / shared."""
    keys = [column for column in ("part", "local") if column in parts.columns]
    summary = parts.groupby(keys, sort=False).agg(
        tensors=("param", "count"), numel=("numel", "sum"), bytes=("bytes", "sum")
    )
    return summary.reset_index()


def config_table(config: dict) -> pd.DataFrame:
    """A (nested) JSON object as a two-column setting / value table, nested keys joined by dots."""
    rows = []

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            rows.append({"setting": prefix, "value": text if len(text) <= 200 else text[:197] + "..."})

    walk("", config)
    return pd.DataFrame(rows, columns=["setting", "value"])
