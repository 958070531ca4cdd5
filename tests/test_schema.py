"""One definition per piece of shared knowledge: table columns, metric and part names, the atomic write,
the settings a resumed run may change, the rank correlation and the file-name slug."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from fedsens.personalize import config, federation, model, partition, runio, schema
from fedsens.personalize.federation import RunConfig, run
from fedsens.personalize.ranks import spearman
from fedsens.reports import figures
from fedsens.sensitivity import compare, divergence, ranking, runs, sweep


def test_every_copy_is_the_schemas_own_object():
    assert divergence.METRICS is schema.DIVERGENCE_METRICS and ranking.DIVERGENCE_METRICS is schema.DIVERGENCE_METRICS
    assert model.PART_TYPES is schema.PART_TYPES and figures.PART_TYPES is schema.PART_TYPES
    assert runio.TABLE_COLUMNS is schema.RUN_TABLE_COLUMNS
    assert sweep.SENSITIVITY_COLUMNS is schema.SENSITIVITY_COLUMNS and ranking.RANKING_COLUMNS is schema.RANKING_COLUMNS
    assert compare.COMPARISON_COLUMNS is schema.COMPARISON_COLUMNS and compare.SUMMARY_COLUMNS is schema.SUMMARY_COLUMNS
    assert runs.FREE_SETTINGS is config.FREE_SETTINGS and federation.FREE_SETTINGS is config.FREE_SETTINGS
    assert [f"div_{m}" for m in schema.DIVERGENCE_METRICS] == [c for c in schema.SENSITIVITY_COLUMNS if "div_" in c]


def test_a_run_writes_the_schemas_columns_and_resumes_with_verify_changed(tmp_path):
    settings = dict(dataset="synthetic", model="vit-nano", clients=2, rounds=1, local_steps=1, out=str(tmp_path))
    result = run(RunConfig(**settings), quiet=True)
    assert list(result.metrics.columns) == schema.METRICS_COLUMNS
    assert list(pd.read_csv(tmp_path / "parts.csv").columns) == schema.PARTS_COLUMNS
    # verify only says whether checksums are checked: a run may be continued with it changed.
    resumed = run(RunConfig(**{**settings, "rounds": 2, "verify": False}), resume=True, quiet=True)
    assert resumed.summary["rounds"] == 2


def test_a_failed_atomic_write_leaves_the_old_file_and_no_scratch(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        runio.replace_atomically(target, half_then_fail)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]
    saved = partition.save(
        partition.make([0, 1, 0, 1, 0, 1, 0, 1], scheme="iid", num_clients=2, seed=0),
        tmp_path / "p",
        labels=[0, 1, 0, 1, 0, 1, 0, 1],
    )
    assert saved.is_file() and not list(saved.parent.glob("*.tmp"))


def test_spearman_is_shared_by_the_ranking_and_the_figures():
    rows = pd.DataFrame({"rank": [1, 2, 3, 4], "rank_gain": [1, 3, 2, 4]})
    assert figures._spearman(rows) == pytest.approx(0.8) == spearman(rows["rank"], rows["rank_gain"])
    assert math.isnan(spearman(pd.Series([1, 2]), pd.Series([2, 1])))  # fewer than 3 parts: no order
    assert math.isnan(spearman(pd.Series([1, 1, 1]), pd.Series([1, 2, 3])))  # a constant: no order


def test_one_slug_names_cells_and_figures():
    assert runio.slug("attn, head") == "attn+head" and runio.slug("attn@9-11") == "attn@9-11"
    assert runio.slug("digits/dirichlet/0.1") == "digits_dirichlet_0.1"
    cell = sweep.Cell("digits", "dirichlet", 0.3, 0, "attn,head")
    assert cell.name == "digits-dirichlet-a0.3-s0-attn+head"
