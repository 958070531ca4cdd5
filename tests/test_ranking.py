"""The ranking: t-intervals across seeds, divergence rankings and their Spearman agreement, top_parts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fedsens.personalize.errors import UserError
from fedsens.personalize.schema import RANKING_COLUMNS
from fedsens.sensitivity.ranking import rank, t_interval, top_parts

GAINS = {"attn": [0.10, 0.14], "head": [0.20, 0.24], "mlp": [0.01, -0.01], "embed": [-0.05, -0.03], "all": [0.5, 0.6]}
# Sensitivity order by construction: head > attn > mlp > embed.
DIVERGENCE = {
    "update_cos": {"head": 0.1, "attn": 0.3, "mlp": 0.5, "embed": 0.9},  # lower = more sensitive
    "rel_drift": {"head": 0.9, "attn": 0.5, "mlp": 0.3, "embed": 0.1},  # higher = more sensitive
    "weight_div": {"head": 0.1, "attn": 0.3, "mlp": 0.5, "embed": 0.9},  # reversed on purpose
    "cka": {"head": 0.5, "attn": 0.6, "mlp": 0.7, "embed": 0.8},  # lower = more sensitive
}


def _table(dataset: str = "digits", alpha: float = 0.3, failed: tuple[str, ...] = ()) -> pd.DataFrame:
    rows = []
    for seed in (0, 1):
        rows.append(
            dict(
                dataset=dataset,
                scheme="dirichlet",
                alpha=alpha,
                seed=seed,
                local_part="none",
                status="done",
                gain_vs_fedavg=0.0,
                **{f"div_{m}": math.nan for m in DIVERGENCE},
            )
        )
        for part, gains in GAINS.items():
            divergence = {f"div_{m}": values.get(part, math.nan) + 0.01 * seed for m, values in DIVERGENCE.items()}
            status = "failed" if part in failed else "done"
            rows.append(
                dict(
                    dataset=dataset,
                    scheme="dirichlet",
                    alpha=alpha,
                    seed=seed,
                    local_part=part,
                    status=status,
                    gain_vs_fedavg=gains[seed] if status == "done" else math.nan,
                    **divergence,
                )
            )
    return pd.DataFrame(rows)


def _block(ranking: pd.DataFrame, metric: str) -> pd.DataFrame:
    return ranking[ranking["metric"] == metric].set_index("part")


def test_t_interval_by_hand():
    mean, low, high = t_interval(np.array([1.0, 2.0, 3.0]))
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)  # sample std 1
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert t_interval(np.array([0.4]))[0] == 0.4 and all(math.isnan(v) for v in t_interval(np.array([0.4]))[1:])
    assert t_interval(np.array([0.2, 0.2, math.nan])) == (0.2, 0.2, 0.2)
    assert all(math.isnan(v) for v in t_interval(np.array([])))


def test_accuracy_block_orders_parts_and_leaves_all_unranked():
    ranking = rank(_table())
    assert list(ranking.columns) == RANKING_COLUMNS
    gain = _block(ranking, "gain_vs_fedavg")
    assert gain.loc[["head", "attn", "mlp", "embed"], "rank"].tolist() == [1, 2, 3, 4]
    assert "none" not in gain.index
    assert math.isnan(gain.loc["all", "rank"]) and gain.loc["all", "score"] == pytest.approx(0.55)
    assert gain.loc["head", "score"] == pytest.approx(0.22)
    low, high = stats.t.interval(0.95, 1, loc=0.22, scale=stats.sem([0.20, 0.24]))
    assert (gain.loc["head", "ci_low"], gain.loc["head", "ci_high"]) == pytest.approx((low, high))


def test_divergence_blocks_rank_by_sensitivity_and_correlate_with_gain():
    ranking = rank(_table())
    for metric, expected in (("update_cos", 1.0), ("rel_drift", 1.0), ("weight_div", -1.0), ("cka", 1.0)):
        block = _block(ranking, metric)
        assert set(block.index) == {"head", "attn", "mlp", "embed"}  # no none, no all
        assert block["spearman_vs_gain"].unique().tolist() == [pytest.approx(expected)]
    assert _block(ranking, "update_cos").loc["head", "rank"] == 1
    assert _block(ranking, "rel_drift").loc["head", "rank"] == 1
    assert _block(ranking, "cka").loc["embed", "rank"] == 4
    assert _block(ranking, "rel_drift").loc["attn", "score"] == pytest.approx(0.505)


def test_failed_cells_do_not_count_and_partitions_rank_apart():
    table = pd.concat([_table(failed=("head",)), _table(alpha=1.0)], ignore_index=True)
    ranking = rank(table)
    first = ranking[(ranking["alpha"] == 0.3) & (ranking["metric"] == "gain_vs_fedavg")].set_index("part")
    assert math.isnan(first.loc["head", "score"]) and first.loc["attn", "rank"] == 1
    second = ranking[(ranking["alpha"] == 1.0) & (ranking["metric"] == "gain_vs_fedavg")].set_index("part")
    assert second.loc["head", "rank"] == 1


def test_spearman_needs_three_parts():
    table = _table()
    ranking = rank(table[table["local_part"].isin(["none", "head", "attn"])])
    assert _block(ranking, "rel_drift")["spearman_vs_gain"].isna().all()


@pytest.fixture
def sweep_dir(tmp_path):
    rank(_table()).to_csv(tmp_path / "ranking.csv", index=False)
    return tmp_path


def test_top_parts_takes_the_best_gains(sweep_dir):
    assert top_parts(sweep_dir, 1) == "head"
    assert top_parts(sweep_dir, 2) == "head,attn"
    assert top_parts(sweep_dir, 4) == "head,attn,mlp,embed"  # never 'all'


def test_top_parts_merges_repeated_terms(tmp_path):
    table = _table()
    table.loc[table["local_part"] == "mlp", "local_part"] = "attn,head"
    table.loc[table["local_part"] == "attn,head", "gain_vs_fedavg"] = 0.3
    rank(table).to_csv(tmp_path / "ranking.csv", index=False)
    assert top_parts(tmp_path, 2) == "attn,head"


def test_top_parts_bad_requests(sweep_dir, tmp_path):
    with pytest.raises(UserError, match="ranks only 4 parts"):
        top_parts(sweep_dir, 5)
    with pytest.raises(UserError, match="--top must be at least 1"):
        top_parts(sweep_dir, 0)
    with pytest.raises(UserError, match="no ranking.csv"):
        top_parts(tmp_path / "nowhere", 1)
