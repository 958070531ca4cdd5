"""The report's figures and text for a validation (`fedsens validate --out DIR`: validation*.csv).

A validation folder is reported on its own, and a sweep folder that holds the validation of its settings in
`validate/` shows the same figures beside its ranking; only `reports.report` writes files.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from fedsens.reports import figures
from fedsens.reports.render import Block, Heading, Paragraph, Table

VALIDATION_FIGURE_NAMES = ("validation", "validation_metrics")


def _flag(values: pd.Series) -> pd.Series:
    """A flag column as written to CSV and read back (True / "True" / NaN) as booleans."""
    return values.map(lambda v: str(v) == "True")


def plot_validation(validation: pd.DataFrame, *, ax: Axes | None = None) -> Figure:
    """Per planted effect, the sweep's top part's tail gain over FedAvg against the strength of the effect,
    with its 95% hierarchical-bootstrap interval; a filled marker where the planted part was found (ranked
    first, resolved from the next and above zero), hollow where not; each point names the top part.

    `validation`: validation.csv (`effect, strength, top_part, score, boot_low, boot_high, found`)."""
    fig, ax = figures.one_axes(ax, width=6.4, height=4.2)
    effects = figures.distinct_in_order(validation["effect"])
    colors = figures.palette_colors(len(effects))
    for color, effect in zip(colors, effects):
        rows = validation[validation["effect"] == effect].sort_values("strength")
        found = _flag(rows["found"]).to_numpy()
        x, y = rows["strength"].to_numpy(dtype=float), rows["score"].to_numpy(dtype=float)
        low, high = rows["boot_low"].to_numpy(dtype=float), rows["boot_high"].to_numpy(dtype=float)
        known = np.isfinite(low) & np.isfinite(high)
        ax.errorbar(x[known], y[known], yerr=[y[known] - low[known], high[known] - y[known]], fmt="none", ecolor=color)
        ax.plot(x, y, color=color, linewidth=1, label=f"{effect} (expects {_expected(rows)})")
        ax.scatter(x[found], y[found], color=color, s=60, zorder=3)
        ax.scatter(x[~found], y[~found], facecolors="white", edgecolors=color, s=60, zorder=3)
        for xi, yi, part in zip(x, y, rows["top_part"].fillna("-")):
            ax.annotate(str(part), (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize="small")
    ax.axhline(0, color="0.5", linewidth=0.8, linestyle="--")
    ax.set_xlabel("strength: share of the domains changed (none: no domain)")
    ax.set_ylabel("top part's tail gain over FedAvg")
    ax.set_title("Would this sweep find it? Planted effects at these settings")
    handles, labels = ax.get_legend_handles_labels()
    handles += [
        Line2D([], [], marker="o", linestyle="", color="0.3", label="found"),
        Line2D([], [], marker="o", linestyle="", markerfacecolor="white", color="0.3", label="not found"),
    ]
    ax.legend(handles=handles, fontsize="small")
    return fig


def _expected(rows: pd.DataFrame) -> str:
    expected = str(rows["expected"].fillna("").iloc[0])
    return expected.replace("|", " or ") if expected else "nothing above zero"


def plot_metric_validation(metrics: pd.DataFrame, *, ax: Axes | None = None) -> Figure:
    """Per divergence metric (columns) and planted effect at each strength (rows), the part the metric finds
    most sensitive in the FedAvg cells; green where it is the planted part, red where it is not, grey where
    the metric was not recorded.

    `metrics`: validation_metrics.csv (`effect, strength, metric, top_part, points_at_planted`); the no-effect
    rows, which have no planted part, are left out."""
    rows = metrics[metrics["expected"].fillna("") != ""].copy()
    rows["case"] = [f"{e} {s:g}" for e, s in zip(rows["effect"], rows["strength"])]
    cases, names = figures.distinct_in_order(rows["case"]), figures.distinct_in_order(rows["metric"])
    fig, ax = figures.one_axes(ax, width=1.3 * max(len(names), 2) + 2.0, height=0.45 * max(len(cases), 2) + 1.6)
    grid = np.full((len(cases), len(names)), np.nan)  # NaN (grey): the metric was not recorded
    for row in rows.itertuples():
        if pd.notna(row.top_part):
            grid[cases.index(row.case), names.index(row.metric)] = float(str(row.points_at_planted) == "True")
    colors = ListedColormap(["#e8a0a0", "#a0d8a0"]).with_extremes(bad="0.9")
    ax.imshow(np.ma.masked_invalid(grid), cmap=colors, vmin=0, vmax=1, aspect="auto")
    for row in rows.itertuples():
        shown = str(row.top_part) if pd.notna(row.top_part) else "not recorded"
        ax.text(names.index(row.metric), cases.index(row.case), shown, ha="center", va="center")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(cases)), cases)
    ax.grid(False)
    ax.set_title("Does each divergence metric point at the planted part?")
    return fig


def missed_effects(metrics: pd.DataFrame | None) -> dict[str, list[str]]:
    """Per divergence metric, the planted effects (at their largest strength) whose part it does not point at."""
    if metrics is None or not len(metrics):
        return {}
    rows = metrics[metrics["expected"].fillna("") != ""]
    strongest = rows[rows["strength"] == rows.groupby("effect")["strength"].transform("max")]
    missed: dict[str, list[str]] = {}
    for row in strongest.itertuples():
        missed.setdefault(str(row.metric), [])
        if str(row.points_at_planted) != "True":
            missed[str(row.metric)].append(str(row.effect))
    return missed


def validation_headline(summary: pd.DataFrame | None) -> list[Block]:
    """One sentence per planted effect: found from which strength, or not found."""
    if summary is None or not len(summary):
        return [
            Paragraph("This validation has no validation_summary.csv yet: run `fedsens validate` again.", lead=True)
        ]
    clauses = []
    for row in summary.itertuples():
        if row.effect == "none":
            ok = str(row.found) == "True"
            clauses.append(
                "no effect: "
                + ("nothing resolved above zero" if ok else "a part resolved above zero (a false positive)")
            )
        elif pd.notna(row.minimal_detectable):
            clauses.append(f"{row.effect} ({row.expected}): found from strength {row.minimal_detectable:g}")
        else:
            clauses.append(
                f"{row.effect} ({row.expected}): not found (top part {row.top_part} at the largest strength)"
            )
    return [Paragraph("Planted effects at these settings: " + "; ".join(clauses) + ".", lead=True)]


def validation_tables(frames: dict[str, pd.DataFrame]) -> list[Block]:
    blocks: list[Block] = [Heading("Validation (planted effects)")]
    for name, caption in (
        ("validation_summary", "per effect: the minimal detectable strength (validation_summary.csv)"),
        ("validation", "per planted effect and strength (validation.csv)"),
        ("validation_metrics", "each divergence metric's most sensitive part (validation_metrics.csv)"),
    ):
        if name in frames:
            blocks.append(Table(caption, frames[name], collapsed=name != "validation_summary"))
    return blocks if len(blocks) > 1 else []
