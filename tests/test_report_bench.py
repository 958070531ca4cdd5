"""The report on a hand-made bench folder (`fedsens bench --out DIR` -> DIR/bench.csv).

The table holds two configurations measured by fedsens, one of them also by the PFLlib-style loop,
and one whose subprocess failed (an `error`, no measures), as personalize/benchmark.py writes them.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_report import check_report

from fedsens.reports.bench import BENCH_FIGURE_NAMES
from fedsens.reports.report import build_report, detect, plan_figures
from fedsens.reports.tables import read_folder

MIB = 2**20
FAILED = "synthetic-5000-head-fedsens"


def bench_row(config: str, loop: str, clients: int, *, s_per_round: float, ratios, peak_mb: float, local_mb: float):
    """One measured row of bench.csv; the seconds are made up, the columns and their meaning are benchmark.py's."""
    train_ratio, eval_ratio, round_ratio = ratios
    local_bytes = int(local_mb * MIB)
    return {
        "config": config,
        "loop": loop,
        "clients": clients,
        "join_ratio": 0.1,
        "personalize": "head",
        "client_store": "memory",
        "rounds": 2,
        "s_per_round": s_per_round,
        "train_s": 0.4 * s_per_round,
        "eval_s": 0.5 * s_per_round,
        "bookkeeping_s": 0.1 * s_per_round,
        "bare_train_s": 0.4 * s_per_round / train_ratio,
        "bare_eval_s": 0.5 * s_per_round / eval_ratio,
        "train_ratio": train_ratio,
        "eval_ratio": eval_ratio,
        "round_ratio": round_ratio,
        "peak_rss_mb": peak_mb,
        "local_bytes": local_bytes,
        "rss_per_client_kb": peak_mb * 1024 / clients,
        "local_kb_per_client": local_bytes / 1024 / clients,
    }


def with_limit(row: dict, *, round_gflop: float, peak_gflop_s: float) -> dict:
    """The arithmetic-limit columns benchmark.py adds (a bench.csv written before them has none)."""
    achieved = round_gflop / row["s_per_round"]
    return {
        **row,
        "round_gflop": round_gflop,
        "peak_gflop_s": peak_gflop_s,
        "achieved_gflop_s": achieved,
        "achieved_over_peak": achieved / peak_gflop_s,
        "limit_s": round_gflop / peak_gflop_s,
    }


def write_bench_folder(folder: Path) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        with_limit(
            bench_row(
                "synthetic-20-head-fedsens",
                "fedsens",
                20,
                s_per_round=0.48,
                ratios=(1.31, 1.17, 1.38),
                peak_mb=812.4,
                local_mb=0.3,
            ),
            round_gflop=9.6,
            peak_gflop_s=50.0,
        ),
        bench_row(
            "synthetic-20-head-pfllib",
            "pfllib",
            20,
            s_per_round=1.37,
            ratios=(1.62, 6.11, 3.93),
            peak_mb=861.9,
            local_mb=42.0,
        ),
        bench_row(
            "synthetic-400-head-fedsens",
            "fedsens",
            400,
            s_per_round=2.9,
            ratios=(0.96, 1.43, 1.21),
            peak_mb=1043.7,
            local_mb=6.0,
        ),
        {
            "config": FAILED,
            "loop": "fedsens",
            "clients": 5000,
            "error": "Traceback (most recent call last):\n  File ...\nMemoryError: cannot allocate the client store\n",
        },
    ]
    bench = pd.DataFrame(rows)
    bench.to_csv(folder / "bench.csv", index=False)
    return bench


@pytest.fixture(scope="module")
def bench_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bench")
    write_bench_folder(folder)
    return folder


@pytest.fixture(scope="module")
def report(bench_folder) -> str:
    return build_report(bench_folder, quiet=True).read_text(encoding="utf-8")


def lead(html: str) -> str:
    return re.search(r'<p class="lead">(.*?)</p>', html, re.S).group(1)


def test_detect_says_bench(tmp_path):
    write_bench_folder(tmp_path)
    assert detect(tmp_path) == "bench"


def test_bench_report_has_both_figures(bench_folder, report):
    html = check_report(bench_folder, set(BENCH_FIGURE_NAMES))
    assert html == report
    assert set(BENCH_FIGURE_NAMES) == {"bench_ratios", "bench_memory"}
    assert "fedsens bench report" in html
    assert "<h2>Configuration" not in html  # bench.csv names each configuration; there is no config file


def test_headline_gives_each_fedsens_configuration_from_the_table(bench_folder, report):
    bench = pd.read_csv(bench_folder / "bench.csv")
    text = lead(report)
    for row in bench[(bench["loop"] == "fedsens") & bench["round_ratio"].notna()].itertuples():
        assert f"{row.clients:,} clients, head local: {row.round_ratio:.2f}× (training {row.train_ratio:.2f}×" in text
        assert f"peak RSS {row.peak_rss_mb:,.0f} MB against {row.local_bytes / MIB:.3g} MB of local tensors" in text
    assert "20 clients, head local: 1.38×" in text and "400 clients, head local: 1.21×" in text


def test_headline_gives_the_round_against_the_arithmetic_limit_where_measured(bench_folder, report):
    text = lead(report)
    # 9.6 GFLOP in 0.48 s is 20 GFLOP/s: 0.40 of the 50 GFLOP/s peak; 0.19 s at the peak
    assert "0.48 s per round; 9.6 GFLOP, 0.40 of a measured 50 GFLOP/s peak, 0.19 s at the peak)" in text
    assert "2.9 s per round)" in text  # the 400-client row has no limit columns: no clause
    table = (bench_folder / "report" / "report.md").read_text()
    assert "achieved_over_peak" in table and "limit_s" in table


def test_headline_gives_the_speedup_where_both_loops_ran(bench_folder, report):
    bench = pd.read_csv(bench_folder / "bench.csv").set_index("config")
    fedsens, pfllib = (bench.loc[f"synthetic-20-head-{loop}", "s_per_round"] for loop in ("fedsens", "pfllib"))
    text = lead(report)
    assert f"{pfllib / fedsens:.2f}× at 20 clients, head local ({pfllib:.3g} s against {fedsens:.3g} s)" in text
    assert "2.85× at 20 clients" in text
    assert "× at 400 clients" not in text  # measured by fedsens only: no speed-up to give


def test_failed_configuration_is_named_in_a_note_and_left_out(bench_folder, report):
    notes = re.findall(r'<p class="note">(.*?)</p>', report)
    assert len(notes) == 1
    assert FAILED in notes[0] and "MemoryError: cannot allocate the client store" in notes[0]
    assert "5,000" not in lead(report)
    assert "| synthetic-5000-head-fedsens |" in (bench_folder / "report" / "report.md").read_text()


def test_figures_draw_only_the_measured_rows(bench_folder):
    planned, notes = plan_figures(read_folder(bench_folder))
    assert [plan.name for plan in planned] == list(BENCH_FIGURE_NAMES) and len(notes) == 1
    ratios, memory = (plan.draw().axes[0] for plan in planned)
    assert len(ratios.patches) == 3 * 3  # training, evaluation, round for 3 measured rows
    assert any(line.get_linestyle() == "--" and set(line.get_ydata()) == {1.0} for line in ratios.get_lines())
    points = np.concatenate([collection.get_offsets() for collection in memory.collections])
    assert len(points) == 3
    assert sorted(text.get_text() for text in memory.texts) == ["20", "20", "400"]
    (reference,) = [line for line in memory.get_lines() if line.get_linestyle() == "--"]
    x, y = reference.get_xdata(), reference.get_ydata()
    np.testing.assert_allclose(y - x, 812.4 - 0.3)  # y = x + the smallest configuration's overhead


def test_a_bench_whose_every_configuration_failed_still_reports(tmp_path):
    # run_bench writes only config, loop, clients and error when no configuration finished.
    failed = pd.DataFrame([{"config": FAILED, "loop": "fedsens", "clients": 5000, "error": "MemoryError"}])
    failed.to_csv(tmp_path / "bench.csv", index=False)
    for name in BENCH_FIGURE_NAMES:  # figures of an earlier build must not linger
        (tmp_path / "report").mkdir(exist_ok=True)
        (tmp_path / "report" / f"{name}.png").write_bytes(b"stale")
    html = build_report(tmp_path, quiet=True).read_text()
    assert "No fedsens configuration was measured" in html
    assert FAILED in html and "no figure could be made" in html
    assert not list((tmp_path / "report").glob("bench_*.png"))


def test_a_preset_run_is_named_by_its_dataset_and_model():
    from fedsens.reports.tables import bench_setup_label

    digits = pd.Series({"clients": 20, "personalize": "attn", "dataset": "digits", "model": "vit-micro"})
    synthetic = pd.Series({"clients": 20, "personalize": "attn", "dataset": "synthetic", "model": "vit-micro"})
    assert bench_setup_label(digits) == "digits, vit-micro, 20 clients, attn local"
    assert bench_setup_label(synthetic) == "20 clients, attn local"
