"""The report's text and tables for a bench folder (`fedsens bench --out DIR` -> DIR/bench.csv).

The figures are in `reports.figures` (plot_bench_ratios, plot_bench_memory) and are planned in
`reports.report`; everything here is computed from bench.csv, so it says what the table says.
"""

from __future__ import annotations

import pandas as pd

from fedsens.reports.render import Block, Heading, Paragraph, Table
from fedsens.reports.tables import MIB, bench_rows, bench_setups, bench_speedups

# A bench folder's figures (file stems under DIR/report/).
BENCH_FIGURE_NAMES = ("bench_ratios", "bench_memory")
# The columns a reader compares, in the order of the table in docs/scale.md.
SUMMARY_COLUMNS = (
    *("config", "loop", "clients", "personalize", "s_per_round"),
    *("train_ratio", "eval_ratio", "round_ratio", "peak_rss_mb", "local_mb"),
    *("round_gflop", "peak_gflop_s", "achieved_over_peak", "limit_s"),
)


def bench_headline(bench: pd.DataFrame | None) -> list[Block]:
    """Per fedsens configuration its round over the bare compute and its peak RSS against its local tensors,
    then the PFLlib-style loop's round time over fedsens's for each configuration measured with both."""
    measured = bench_rows(bench)[0] if bench is not None else pd.DataFrame(columns=["loop"])
    fedsens = measured[measured["loop"] == "fedsens"]
    if not len(fedsens):
        return [
            Paragraph(
                "No fedsens configuration was measured: bench.csv has no row yet, or every fedsens row failed "
                "(see the notes).",
                lead=True,
            )
        ]
    setups = bench_setups(measured)
    text = "fedsens's time per round over the bare compute (a plain PyTorch loop doing the same steps with one model): "
    text += "; ".join(_fedsens_clause(setups[index], row) for index, row in fedsens.iterrows()) + "."
    speedups = bench_speedups(measured)
    if len(speedups):
        clauses = "; ".join(map(_speedup_clause, speedups.itertuples()))
        text += f" The PFLlib-style loop's time per round over fedsens's (fedsens's speed-up): {clauses}."
    caveat = "Only ratios taken within one bench run compare: absolute seconds swing with the machine's load."
    return [Paragraph(text, lead=True), Paragraph(caveat)]


def _fedsens_clause(setup: str, row: pd.Series) -> str:
    return (
        f"{setup}: {row['round_ratio']:.2f}× (training {row['train_ratio']:.2f}×, evaluation "
        f"{row['eval_ratio']:.2f}×; {row['s_per_round']:.3g} s per round{_limit_clause(row)}), peak RSS "
        f"{row['peak_rss_mb']:,.0f} MB against {megabytes(row['local_bytes'])} MB of local tensors"
    )


def _limit_clause(row: pd.Series) -> str:
    """The round against the arithmetic limit, for tables that measured it (bench.csv before it did not)."""
    if pd.isna(row.get("achieved_over_peak")):
        return ""
    return (
        f"; {row['round_gflop']:.3g} GFLOP, {row['achieved_over_peak']:.2f} of a measured "
        f"{row['peak_gflop_s']:.3g} GFLOP/s peak, {row['limit_s']:.2g} s at the peak"
    )


def _speedup_clause(pair) -> str:
    return (
        f"{pair.speedup:.2f}× at {pair.setup} ({pair.s_per_round_pfllib:.3g} s against "
        f"{pair.s_per_round_fedsens:.3g} s)"
    )


def megabytes(nbytes: float) -> str:
    """Bytes in MB (2**20, as peak_rss_mb), with three significant digits below 100 MB: 0.074, 3.7, 1,736."""
    size = nbytes / MIB
    return f"{size:,.0f}" if size >= 100 else f"{size:.3g}"


def bench_failures(bench: pd.DataFrame | None) -> list[str]:
    """A note per configuration whose subprocess failed (no measures), with the last line of its error."""
    if bench is None:
        return []
    return [
        f"bench.csv: {row['config']} ({row['loop']} loop, {row['clients']:,.0f} clients) failed"
        f"{_last_line(row['error'])}; it is left out of the headline and the figures."
        for _, row in bench_rows(bench)[1].iterrows()
    ]


def _last_line(error) -> str:
    """The exception line of a captured stderr tail (the last non-empty line), or nothing when none was kept."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] if pd.notna(error) else []
    return f" ({lines[-1][:200]})" if lines else " (no measures recorded)"


def bench_tables(bench: pd.DataFrame | None) -> list[Block]:
    """The comparison a reader wants (one row per configuration and loop), then bench.csv whole, collapsed."""
    if bench is None:
        return []
    table = bench.assign(local_mb=bench["local_bytes"] / MIB) if "local_bytes" in bench else bench
    summary = table[[column for column in SUMMARY_COLUMNS if column in table]]
    return [
        Heading("Benchmark"),
        Table("per configuration and loop: seconds per round, time over the bare compute, memory in MB", summary),
        Table("bench.csv", bench, collapsed=True),
    ]
