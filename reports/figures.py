"""One function per figure: long-form DataFrames in, a matplotlib Figure out.

Figures are built on `matplotlib.figure.Figure` (no pyplot state), so they can be made in any
thread and are freed when dropped. Single-panel functions take `ax=` to draw into an existing
Axes; multi-panel ones take `axes=` (one Axes per panel). Only `reports.report` writes files.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import EngFormatter, MaxNLocator

from fedsens.personalize.ranks import spearman
from fedsens.personalize.schema import GAIN, PART_TYPES
from fedsens.reports.tables import MIB, bench_setups, group_column, pareto_cells

STYLE = "whitegrid"
PALETTE = "colorblind"


def _new_axes(ncols: int, *, width: float, height: float, nrows: int = 1, width_ratios=None):
    with sns.axes_style(STYLE):
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False, width_ratios=width_ratios)
    return fig, list(axes.ravel())


def one_axes(ax: Axes | None, *, width: float, height: float) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    fig, axes = _new_axes(1, width=width, height=height)
    return fig, axes[0]


def _panel_axes(axes: Sequence[Axes] | None, count: int, *, width: float, height: float):
    """`count` panels of width x height inches: in one row up to two, else two per row."""
    if axes is None:
        ncols = count if count <= 2 else 2
        nrows = -(-count // ncols)
        fig, made = _new_axes(ncols, nrows=nrows, width=width * ncols, height=height * nrows)
        for spare in made[count:]:
            spare.remove()
        return fig, made[:count]
    if len(axes) != count:
        raise ValueError(f"this figure needs {count} axes, got {len(axes)}")
    return axes[0].figure, list(axes)


def distinct_in_order(values: pd.Series) -> list:
    """Distinct values in order of first appearance."""
    return list(dict.fromkeys(values.tolist()))


def _part_order(parts: pd.Series) -> list[str]:
    """Part types in the order the model is built (input to output); unknown parts go last."""
    present = distinct_in_order(parts)
    known = [part for part in PART_TYPES if part in present]
    return known + [part for part in present if part not in PART_TYPES]


def palette_colors(count: int) -> list:
    return sns.color_palette(PALETTE, n_colors=max(count, 1))


def plot_sensitivity(ranking: pd.DataFrame, *, ax: Axes | None = None) -> Figure:
    """Accuracy gain over FedAvg per kept-local part, with its CI across seeds; rank 1 on top.

    `ranking`: ranking.csv rows (`part, score, ci_low, ci_high, rank`); rows of other metrics
    than `gain_vs_fedavg` are ignored.
    """
    rows = ranking[ranking["metric"] == GAIN] if "metric" in ranking.columns else ranking
    rows = rows.sort_values("rank", na_position="last", kind="stable").reset_index(drop=True)
    fig, ax = one_axes(ax, width=6.4, height=0.45 * len(rows) + 1.4)
    score = rows["score"].to_numpy(float)
    below = score - rows["ci_low"].to_numpy(float)  # NaN (one seed: no interval) draws no error bar
    above = rows["ci_high"].to_numpy(float) - score
    ranked = rows["rank"].notna().to_numpy()
    gain, loss = palette_colors(4)[0], palette_colors(4)[3]
    colors = [(gain if value >= 0 else loss) if is_ranked else "0.7" for value, is_ranked in zip(score, ranked)]
    positions = np.arange(len(rows))
    ax.barh(positions, np.nan_to_num(score), xerr=np.vstack([below, above]), color=colors, capsize=3)
    # Unranked rows (e.g. `all`: nothing shared) are shown for reference, grey and without a rank.
    labels = [
        f"{int(r)}. {p}" if is_ranked else f"{p} (not ranked)"
        for r, p, is_ranked in zip(rows["rank"], rows["part"], ranked)
    ]
    ax.set_yticks(positions, labels)
    ax.invert_yaxis()
    ax.axvline(0, color="0.3", linewidth=0.8)
    ax.set_xlabel("accuracy gain over FedAvg (mean over seeds, CI across seeds)")
    ax.set_ylabel("part kept local (rank)")
    ax.set_title("Which part is most sensitive to heterogeneity")
    return fig


def _without_part_summaries(divergence: pd.DataFrame) -> pd.DataFrame:
    """Drop the rows that summarise a part over its groups (group == part, block -1).

    A part with a single group named after it (embed, head) keeps that row: it is the group itself.
    The figures average the groups themselves, which gives the summaries' values back per part.
    """
    is_summary = divergence["group"] == divergence["part"]
    has_groups = divergence.groupby("part")["group"].transform("nunique") > 1
    return divergence[~(is_summary & has_groups)]


def plot_critical_difference(ranking: pd.DataFrame, *, ax: Axes | None = None) -> Figure:
    """Critical-difference style: each ranked part at its mean Friedman rank over (seed, client) blocks
    (1 = largest gain); a bar joins neighbours in the ranking whose order is not resolved at 95%.

    `ranking`: ranking.csv rows with `mean_rank`, `resolved_vs_next` and `friedman_p` (a sweep of
    several seeds); other metrics' rows are ignored.
    """
    rows = ranking[ranking["metric"] == "gain_vs_fedavg"] if "metric" in ranking.columns else ranking
    rows = rows.dropna(subset=["rank", "mean_rank"]).sort_values("rank", kind="stable").reset_index(drop=True)
    fig, ax = one_axes(ax, width=6.4, height=2.0 + 0.25 * len(rows))
    count = len(rows)
    ax.set_xlim(count + 0.5, 0.5)  # rank 1 on the right, as in Demšar's diagrams
    ax.set_ylim(-(count + 1), 1.5)
    ax.axhline(0, color="0.3", linewidth=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(left=False, labelleft=False)
    for index, (part, mean_rank) in enumerate(zip(rows["part"], rows["mean_rank"])):
        level = -(index + 1)
        ax.plot([mean_rank, mean_rank], [0, level], color="0.4", linewidth=0.8)
        ax.annotate(
            f"{part} ({mean_rank:.2f})",
            (mean_rank, level),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize="small",
        )
    unresolved = rows["resolved_vs_next"].map(lambda v: str(v).lower() in ("false", "0", "0.0"))
    color = palette_colors(1)[0]
    for index in map(int, np.flatnonzero(unresolved.to_numpy())):
        if index + 1 < count:  # the bar joins this part to the next one in the ranking
            ends = rows["mean_rank"].iloc[[index, index + 1]].to_numpy(float)
            height = 0.35 + 0.3 * (index % 3)
            ax.plot(ends, [height, height], color=color, linewidth=4, solid_capstyle="round")
    friedman_p = rows["friedman_p"].dropna() if "friedman_p" in rows.columns else pd.Series(dtype=float)
    note = f"Friedman p = {friedman_p.iloc[0]:.2g}; " if len(friedman_p) else ""
    ax.set_xlabel("mean rank over (seed, client) blocks (1 = largest gain over FedAvg)")
    ax.set_title(f"{note}bars join neighbours not resolved at 95%", fontsize="medium")
    ax.grid(False)
    return fig


def plot_block_gains(ranking: pd.DataFrame, *, ax: Axes | None = None) -> Figure:
    """Gain over FedAvg when one block's part is kept local (`attn@3` ...), by block, one line per part type,
    with the t-interval across seeds as a band. `ranking`: ranking.csv rows (per-block parts only are drawn)."""
    rows = ranking[ranking["metric"] == "gain_vs_fedavg"] if "metric" in ranking.columns else ranking
    found = rows["part"].astype(str).str.extract(r"^([a-z]+)@(\d+)$")
    rows = rows.assign(kind=found[0], block=pd.to_numeric(found[1])).dropna(subset=["kind"])
    fig, ax = one_axes(ax, width=6.4, height=4.0)
    kinds = _part_order(rows["kind"])
    colors = dict(zip(kinds, palette_colors(len(kinds))))
    for kind in kinds:
        line = rows[rows["kind"] == kind].sort_values("block")
        ax.plot(line["block"], line["score"], marker="o", color=colors[kind], label=kind)
        ax.fill_between(line["block"], line["ci_low"], line["ci_high"], color=colors[kind], alpha=0.15)
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block kept local (0 = next to the input)")
    ax.set_ylabel("accuracy gain over FedAvg")
    ax.set_title("Sensitivity by block")
    ax.legend(title="part", fontsize="small")
    return fig


def _divergence_table(divergence: pd.DataFrame, metric: str, rounds: str) -> pd.DataFrame:
    rows = divergence[divergence["metric"] == metric]
    if rounds == "last":
        rows = rows[rows["round"] == rows["round"].max()]
    table = rows.pivot_table(index="block", columns="part", values="value", aggfunc="mean")
    # reindex, not []: a part whose metric is undefined everywhere (pivot_table drops all-NaN columns: Swin's
    # embed, split between patch_embed and the stages' patch merging, has no one module for CKA) stays blank
    return table.reindex(columns=_part_order(rows["part"])).sort_index()


def plot_divergence_heatmap(
    divergence: pd.DataFrame, *, rounds: str = "mean", axes: Sequence[Axes] | None = None
) -> Figure:
    """One heatmap per divergence metric: block (rows) by part (columns).

    `divergence`: divergence.csv rows (`round, group, part, block, metric, value`); values are averaged
    over rounds (`rounds="mean"`) or taken at the last round (`rounds="last"`), and over any
    groups, seeds or cells that share a block and part. Block -1 holds the parts outside the blocks.
    """
    if rounds not in ("mean", "last"):
        raise ValueError(f"rounds must be 'mean' or 'last', got {rounds!r}")
    divergence = _without_part_summaries(divergence)
    metrics = distinct_in_order(divergence["metric"])
    blocks = divergence["block"].nunique()
    fig, axes = _panel_axes(axes, len(metrics), width=3.8, height=0.35 * blocks + 1.8)
    for ax, metric in zip(axes, metrics):
        table = _divergence_table(divergence, metric, rounds)
        small = table.size <= 80
        sns.heatmap(table, ax=ax, cmap="viridis", annot=small, fmt=".2f", cbar_kws={"label": metric})
        ax.grid(False)
        ax.tick_params(axis="y", rotation=0)
        ax.set_title(metric)
        ax.set_xlabel("part")
        ax.set_ylabel("block (-1: outside the blocks)")
    return fig


def plot_divergence_rounds(divergence: pd.DataFrame, *, axes: Sequence[Axes] | None = None) -> Figure:
    """Each part's divergence metric over rounds (mean over its groups), one panel per metric."""
    divergence = _without_part_summaries(divergence)
    metrics = distinct_in_order(divergence["metric"])
    fig, axes = _panel_axes(axes, len(metrics), width=4.0, height=3.2)
    parts = _part_order(divergence["part"])
    colors = dict(zip(parts, palette_colors(len(parts))))
    for ax, metric in zip(axes, metrics):
        rows = divergence[divergence["metric"] == metric]
        curves = rows.groupby(["part", "round"])["value"].mean()
        for part in parts:
            if part in curves.index.get_level_values(0):
                curve = curves.loc[part]
                ax.plot(curve.index, curve.to_numpy(), marker="o", markersize=3, label=part, color=colors[part])
        ax.set_title(metric)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
    axes[-1].legend(title="part", fontsize="small")
    return fig


def plot_rank_agreement(
    ranking: pd.DataFrame, *, missed: dict[str, list[str]] | None = None, ax: Axes | None = None
) -> Figure:
    """Each divergence metric's (and the probe's, when one ran) ranking of the parts against the
    accuracy-gain ranking.

    `ranking`: ranking.csv (`part, rank, metric` and, if present, `spearman_vs_gain`). Points on
    the diagonal are parts a metric ranks exactly as the sweep's accuracy gains do. `missed`: per metric,
    the planted effects (from a validation of these settings) whose part it does not point at; the legend
    says so.
    """
    gain = ranking[ranking["metric"] == GAIN][["part", "rank"]].dropna()
    others = ranking[ranking["metric"] != GAIN].dropna(subset=["rank"])
    metrics = distinct_in_order(others["metric"])
    fig, ax = one_axes(ax, width=6.0, height=4.6)
    colors = palette_colors(len(metrics))
    markers = "osD^vP*X"
    for index, metric in enumerate(metrics):
        rows = others[others["metric"] == metric].merge(gain, on="part", suffixes=("", "_gain"))
        rho = _spearman(rows)
        dodge = (index - (len(metrics) - 1) / 2) * 0.08  # metrics that agree would hide each other
        ax.scatter(
            rows["rank_gain"] + dodge,
            rows["rank"],
            s=60,
            alpha=0.8,
            color=colors[index],
            marker=markers[index % len(markers)],
            label=(f"{metric} (Spearman ρ = {rho:+.2f})" if np.isfinite(rho) else f"{metric} (Spearman ρ: n/a)")
            + _missed_note((missed or {}).get(metric)),
        )
    top = len(gain)
    ax.plot([1, top], [1, top], linestyle="--", color="0.5", linewidth=0.8)
    ordered = gain.sort_values("rank")
    ax.set_xticks(ordered["rank"], [f"{int(r)}\n{p}" for r, p in zip(ordered["rank"], ordered["part"])])
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("rank by accuracy gain over FedAvg")
    ax.set_ylabel("rank by divergence metric (FedAvg cell) or probe")
    ax.set_title("Does FedAvg divergence predict the sweep's ranking?")
    ax.legend(fontsize="small")
    return fig


def _missed_note(effects: list[str] | None) -> str:
    """What the legend says of a metric checked on planted datasets."""
    if effects is None:
        return ""
    return f"; misses planted {', '.join(effects)}" if effects else "; points at every planted part"


def _spearman(rows: pd.DataFrame) -> float:
    if "spearman_vs_gain" in rows.columns:  # the sweep's own value, NaN where it could not say
        known = rows["spearman_vs_gain"].dropna()
        return float(known.iloc[0]) if len(known) else float("nan")
    return spearman(rows["rank"], rows["rank_gain"])


def plot_training_curves(rounds: pd.DataFrame, *, hue: str | None = None, ax: Axes | None = None) -> Figure:
    """Mean client test accuracy per round with a band of ± one std across clients.

    `rounds`: rounds.csv (`round, acc_mean, acc_std`), optionally with a `hue` column (default:
    `method` or `local_part`); rows of the same hue and round (seeds) are averaged.
    """
    hue = hue or group_column(rounds)
    rows = rounds.dropna(subset=["acc_mean"])
    fig, ax = one_axes(ax, width=6.4, height=4.0)
    groups = distinct_in_order(rows[hue]) if hue else [None]
    for color, group in zip(palette_colors(len(groups)), groups):
        subset = rows if group is None else rows[rows[hue] == group]
        curve = subset.groupby("round")[["acc_mean", "acc_std"]].mean()
        mean, spread = curve["acc_mean"].to_numpy(), curve["acc_std"].fillna(0).to_numpy()
        ax.plot(curve.index, mean, color=color, marker="o", markersize=3, label=group)
        low, high = np.clip(mean - spread, 0, 1), np.clip(mean + spread, 0, 1)  # an accuracy lies in [0, 1]
        ax.fill_between(curve.index, low, high, color=color, alpha=0.18, linewidth=0)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean client test accuracy")
    ax.set_title("Training curves (band: ± std across clients)")
    if hue:
        ax.legend(title=hue, fontsize="small")
    return fig


def plot_fairness(final: pd.DataFrame, *, hue: str | None = None, ax: Axes | None = None) -> Figure:
    """Per-client final test accuracy per method / part (box + points), each group's p10 marked.

    `final`: one row per client and run with an `accuracy` column (see
    `reports.tables.final_client_accuracy`), optionally with a `hue` column.
    """
    hue = hue or group_column(final)
    data = final.assign(group=final[hue].astype(str) if hue else "run")
    order = distinct_in_order(data["group"])
    fig, ax = one_axes(ax, width=max(4.0, 1.1 * len(order) + 2.0), height=4.0)
    values = [data.loc[data["group"] == group, "accuracy"].to_numpy(float) for group in order]
    boxes = ax.boxplot(
        values,
        positions=np.arange(len(order)),
        widths=0.6,
        patch_artist=True,
        showfliers=False,
        medianprops={"color": "0.15"},
    )
    for patch, color in zip(boxes["boxes"], palette_colors(len(order))):
        patch.set(facecolor=color, alpha=0.6)
    sns.stripplot(
        data=data,
        x="group",
        y="accuracy",
        order=order,
        color="0.25",
        size=3,
        alpha=0.5,
        jitter=0.2,
        ax=ax,
        native_scale=False,
    )
    p10 = data.groupby("group")["accuracy"].quantile(0.1).reindex(order)
    ax.scatter(
        np.arange(len(order)),
        p10.to_numpy(),
        marker="D",
        s=55,
        color="crimson",
        zorder=5,
        label="worst 10% of clients (p10)",
        gid="p10",
    )
    ax.set_xticks(np.arange(len(order)), order)
    ax.set_xlabel(hue or "")
    ax.set_ylabel("client test accuracy (last evaluated round)")
    ax.set_title("Fairness across clients")
    ax.legend(fontsize="small", loc="best")
    return fig


def plot_cost(table: pd.DataFrame, *, hue: str | None = None, axes: Sequence[Axes] | None = None) -> Figure:
    """Accuracy against communication bytes per round (left) and local parameter count (right).

    `table`: comparison.csv or sensitivity.csv rows (`acc_mean, comm_bytes_per_round,
    local_params` and a `hue` column); each group is drawn at its mean with ± std over seeds.
    """
    hue = hue or group_column(table)
    rows = table.dropna(subset=["acc_mean"])
    fig, axes = _panel_axes(axes, 2, width=4.4, height=3.8)
    groups = distinct_in_order(rows[hue]) if hue else [None]
    columns = (
        ("comm_bytes_per_round", "communication per round", "B"),
        ("local_params", "local parameters per client", ""),
    )
    for color, group in zip(palette_colors(len(groups)), groups):
        subset = rows if group is None else rows[rows[hue] == group]
        accuracy = subset["acc_mean"].to_numpy(float)
        spread = accuracy.std() if len(accuracy) > 1 else 0.0
        for ax, (column, _, _) in zip(axes, columns):
            x = subset[column].to_numpy(float).mean()
            ax.errorbar(
                [x], [accuracy.mean()], yerr=[spread], fmt="o", color=color, capsize=3, markersize=7, label=group
            )
    for ax, (_, label, unit) in zip(axes, columns):
        ax.set_xlabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.xaxis.set_major_formatter(EngFormatter(unit=unit))
        ax.set_ylabel("mean client test accuracy")
    axes[0].set_title("Accuracy vs communication")
    axes[1].set_title("Accuracy vs local parameters")
    if hue:
        axes[1].legend(title=hue, fontsize="small")
    return fig


def plot_gain_cost(ranking: pd.DataFrame, *, ax: Axes | None = None) -> Figure:
    """Each (part, mechanism) cell's gain over FedAvg against the parameters it keeps on each client (log x),
    with its interval (the hierarchical bootstrap where there is one, else the t-interval across seeds);
    the cells no other cell beats on both (the Pareto front) are ringed and joined.

    `ranking`: ranking.csv's accuracy rows (`part, score, ci_low, ci_high, mechanism, local_params`, optionally
    `boot_low, boot_high`). A cell with no local parameter (`finetune`) is drawn at 1.
    """
    rows = ranking[ranking["metric"] == GAIN] if "metric" in ranking.columns else ranking
    rows = rows.dropna(subset=["score", "local_params"]).reset_index(drop=True)
    fig, ax = one_axes(ax, width=7.2, height=4.6)
    boot = "boot_low" in rows and rows["boot_low"].notna().any()
    low, high = (rows["boot_low"], rows["boot_high"]) if boot else (rows["ci_low"], rows["ci_high"])
    x = rows["local_params"].to_numpy(float).clip(min=1)
    score = rows["score"].to_numpy(float)
    mechanisms = distinct_in_order(rows["mechanism"].astype(str))
    for color, mechanism in zip(palette_colors(len(mechanisms)), mechanisms):
        mine = (rows["mechanism"].astype(str) == mechanism).to_numpy()
        error = np.vstack([score[mine] - low[mine].to_numpy(float), high[mine].to_numpy(float) - score[mine]])
        ax.errorbar(x[mine], score[mine], yerr=np.nan_to_num(error), fmt="o", color=color, capsize=3, label=mechanism)
    front = rows["part"].astype(str).isin(pareto_cells(rows)).to_numpy()
    order = np.argsort(x[front])
    ax.plot(x[front][order], score[front][order], "--", color="0.4", linewidth=0.8)
    ax.scatter(x[front], score[front], s=160, facecolors="none", edgecolors="0.1", label="Pareto front")
    for xi, yi, part in zip(x, score, rows["part"].astype(str)):
        ax.annotate(part, (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize="x-small")
    ax.set_xscale("log")
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.set_xlabel("parameters kept local per client (log)")
    interval = "bootstrap" if boot else "t-interval"
    ax.set_ylabel(f"accuracy gain over FedAvg (95% {interval})")
    ax.set_title("Gain against cost: where and how to personalize")
    ax.legend(title="mechanism", fontsize="small")
    return fig


def plot_partition(counts: pd.DataFrame, *, axes: Sequence[Axes] | None = None) -> Figure:
    """Clients × classes heat map of sample counts, plus clients × domains where there are any.

    `counts`: long form `client, axis ("class" / "domain"), name, count` (see
    `reports.tables.partition_counts`).
    """
    kinds = [kind for kind in ("class", "domain") if (counts["axis"] == kind).any()]
    tables = [_count_table(counts[counts["axis"] == kind]) for kind in kinds]
    clients = tables[0].shape[0]
    height = min(10.0, 0.22 * clients + 1.8)
    if axes is None:
        ratios = [max(table.shape[1], 2) + 2 for table in tables]
        width = min(14.0, 0.22 * sum(ratios) + 2.5)
        fig, axes = _new_axes(len(tables), width=max(width, 5.0), height=height, width_ratios=ratios)
    else:
        fig, axes = _panel_axes(axes, len(tables), width=0, height=0)
    for ax, kind, table in zip(axes, kinds, tables):
        annot = bool(table.size <= 120)  # a plain bool: seaborn 0.13.0 takes numpy.bool_ for an array of labels
        sns.heatmap(table, ax=ax, cmap="rocket_r", annot=annot, fmt="d", cbar_kws={"label": "samples"})
        ax.grid(False)
        ax.tick_params(axis="y", rotation=0)
        ax.set_xlabel(kind)
        ax.set_ylabel("client")
        ax.set_title(f"samples per client and {kind}")
    return fig


def _count_table(rows: pd.DataFrame) -> pd.DataFrame:
    table = rows.pivot_table(index="client", columns="name", values="count", aggfunc="sum", sort=False)
    return table[distinct_in_order(rows["name"])].fillna(0).astype(int)


BENCH_RATIOS = (("train_ratio", "training"), ("eval_ratio", "evaluation"), ("round_ratio", "whole round"))
LOOP_NAMES = {"fedsens": "fedsens", "pfllib": "PFLlib-style"}
LOOP_HATCHES = {"fedsens": "", "pfllib": "//"}


def _bench_loops(rows: pd.DataFrame) -> list[str]:
    """The loops in the table, fedsens first (the reference loop is what it is compared with)."""
    return sorted(distinct_in_order(rows["loop"]), key=lambda loop: loop != "fedsens")


def plot_bench_ratios(measured: pd.DataFrame, *, ax: Axes | None = None) -> Figure:
    """Training, evaluation and whole-round time over the bare compute, grouped by configuration: one colour
    per ratio, the PFLlib-style loop's bars hatched beside fedsens's, a dashed line at 1.0 (the bare compute).

    `measured`: bench.csv rows that have their measures (see `reports.tables.bench_rows`); rows of the same
    configuration and loop are averaged.
    """
    rows = measured.assign(setup=bench_setups(measured))
    setups, loops = distinct_in_order(rows["setup"]), _bench_loops(rows)
    ratios = rows.groupby(["setup", "loop"])[[column for column, _ in BENCH_RATIOS]].mean()
    fig, ax = one_axes(ax, width=max(6.4, 1.4 * len(setups) * len(loops) + 2.0), height=4.4)
    colors = palette_colors(len(BENCH_RATIOS))
    slots = len(loops) * len(BENCH_RATIOS)
    width = 0.8 / slots
    for j, loop in enumerate(loops):
        for k, (column, _) in enumerate(BENCH_RATIOS):
            present = [i for i, setup in enumerate(setups) if (setup, loop) in ratios.index]
            offset = (j * len(BENCH_RATIOS) + k - (slots - 1) / 2) * width
            values = [ratios.loc[(setups[i], loop), column] for i in present]
            bars = ax.bar(
                np.asarray(present) + offset,
                values,
                width,
                color=colors[k],
                hatch=LOOP_HATCHES.get(loop, ".."),
                edgecolor="0.25",
                linewidth=0.5,
            )
            if column == "round_ratio":  # the number a reader compares between loops
                ax.bar_label(bars, fmt="{:.2f}×", fontsize="x-small", padding=1)
    ax.axhline(1.0, linestyle="--", color="0.3", linewidth=1)
    ax.set_xticks(np.arange(len(setups)), [setup.replace(", ", "\n") for setup in setups])
    ax.set_ylabel("time / bare compute (×)")
    ax.set_title("Time per round over the bare compute (dashed: 1.0 = bare)")
    handles = [Patch(facecolor=color, edgecolor="0.25", label=label) for color, (_, label) in zip(colors, BENCH_RATIOS)]
    handles += [
        Patch(facecolor="white", edgecolor="0.25", hatch=LOOP_HATCHES.get(loop, ".."), label=LOOP_NAMES.get(loop, loop))
        for loop in loops
    ]
    ax.legend(handles=handles, fontsize="small", ncols=2)
    return fig


def plot_bench_memory(measured: pd.DataFrame, *, ax: Axes | None = None) -> Figure:
    """Peak RSS against the bytes of the local tensors (both in MB), one point per configuration and loop,
    labelled by client count, with the line y = x + the smallest configuration's RSS beyond its local tensors:
    points on it mean memory grows by exactly the local state.

    `measured`: bench.csv rows that have their measures (see `reports.tables.bench_rows`).
    """
    rows = measured.assign(local_mb=measured["local_bytes"] / MIB)
    fig, ax = one_axes(ax, width=6.4, height=4.4)
    loops = _bench_loops(rows)
    for color, loop in zip(palette_colors(len(loops)), loops):
        points = rows[rows["loop"] == loop]
        marker = "o" if loop == "fedsens" else "s"
        ax.scatter(
            points["local_mb"],
            points["peak_rss_mb"],
            s=50,
            color=color,
            marker=marker,
            label=LOOP_NAMES.get(loop, loop),
        )
    for label, x, y in zip(_bench_point_labels(rows), rows["local_mb"], rows["peak_rss_mb"]):
        ax.annotate(label, (x, y), xytext=(5, 4), textcoords="offset points", fontsize="x-small")
    smallest = rows.loc[rows["local_mb"].idxmin()]
    overhead = float(smallest["peak_rss_mb"] - smallest["local_mb"])
    low, high = float(rows["local_mb"].min()), float(rows["local_mb"].max())
    spread = low > 0 and high / low > 50  # local state from kilobytes to gigabytes: only a log axis shows both
    line = np.geomspace(low, high, 200) if spread else np.linspace(0, max(high, 1e-9) * 1.05, 200)
    ax.plot(
        line,
        line + overhead,
        linestyle="--",
        color="0.4",
        linewidth=1,
        label=f"y = x + {overhead:,.0f} MB (smallest configuration's RSS beyond its local tensors)",
    )
    if spread:
        ax.set_xscale("log")
    ax.set_xlabel("local tensors (MB)")
    ax.set_ylabel("peak RSS (MB)")
    ax.set_title("Does memory track the local state?")
    ax.legend(title="loop (labels: clients)", fontsize="small")
    return fig


def _bench_point_labels(rows: pd.DataFrame) -> list[str]:
    """Each point's client count, with its local part where the configurations keep different parts local."""
    labels = [f"{int(clients):,}" for clients in rows["clients"]]
    if "personalize" in rows and rows["personalize"].nunique() > 1:
        parts = rows["personalize"].astype(str).str.replace(",", "+")
        labels = [f"{label} ({part})" for label, part in zip(labels, parts)]
    return labels
