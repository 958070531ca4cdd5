"""Each figure function on small hand-made tables: the axes, labels and artists it must draw."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection, PolyCollection, QuadMesh
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure

from fedsens.reports import figures
from fedsens.reports.tables import final_client_accuracy, partition_counts


def _heatmaps(fig: Figure) -> list[QuadMesh]:
    """The heat maps' meshes, not their colour bars' (which are QuadMeshes too)."""
    return [c for ax in fig.axes if ax.get_label() != "<colorbar>" for c in ax.collections if isinstance(c, QuadMesh)]


def _ranking(divergence_orders: dict[str, list[str]], with_rho: bool = True) -> pd.DataFrame:
    gain_order = ["attn", "head", "mlp"]
    rows = [
        {
            "part": part,
            "score": 0.3 - 0.1 * i,
            "ci_low": 0.25 - 0.1 * i,
            "ci_high": 0.4 - 0.1 * i,
            "rank": i + 1,
            "metric": "gain_vs_fedavg",
        }
        for i, part in enumerate(gain_order)
    ]
    for metric, order in divergence_orders.items():
        rho = pd.Series([order.index(p) for p in gain_order]).corr(pd.Series(range(3)), method="spearman")
        rows += [
            {
                "part": part,
                "score": 1.0,
                "ci_low": np.nan,
                "ci_high": np.nan,
                "rank": i + 1,
                "metric": metric,
                **({"spearman_vs_gain": rho} if with_rho else {}),
            }
            for i, part in enumerate(order)
        ]
    return pd.DataFrame(rows)


def test_sensitivity_bars_follow_the_ranking_with_their_ci():
    ranking = _ranking({"update_cos": ["mlp", "head", "attn"]}).sample(frac=1, random_state=0)
    fig = figures.plot_sensitivity(ranking)
    (ax,) = fig.axes
    assert len(ax.patches) == 3  # divergence rows are not bars
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1. attn", "2. head", "3. mlp"]
    assert [round(bar.get_width(), 6) for bar in ax.patches] == [0.3, 0.2, 0.1]
    (errorbars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    whiskers = errorbars.lines[2][0].get_segments()
    assert [tuple(np.round(w[:, 0], 6)) for w in whiskers] == [(0.25, 0.4), (0.15, 0.3), (0.05, 0.2)]
    assert "gain over FedAvg" in ax.get_xlabel()


def test_sensitivity_bars_of_one_seed_have_no_error_bars():
    ranking = _ranking({}).assign(ci_low=np.nan, ci_high=np.nan)
    (ax,) = figures.plot_sensitivity(ranking).axes
    (errorbars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert all(segment.size == 0 for segment in errorbars.lines[2][0].get_segments())


def _divergence() -> pd.DataFrame:
    rows = []
    for round_ in (1, 2):
        for metric in ("update_cos", "weight_div"):
            for block in (0, 1):
                for part in ("mlp", "attn"):  # deliberately out of model order
                    rows.append(
                        {
                            "round": round_,
                            "group": f"blocks.{block}.{part}",
                            "part": part,
                            "block": block,
                            "metric": metric,
                            "value": round_ * 10 + block + (0.5 if part == "mlp" else 0),
                        }
                    )
            rows.append(
                {
                    "round": round_,
                    "group": "head",
                    "part": "head",
                    "block": -1,
                    "metric": metric,
                    "value": float(round_),
                }
            )
            for part in ("attn", "mlp"):  # the part summaries that divergence.py adds: group = part, block -1
                rows.append(
                    {"round": round_, "group": part, "part": part, "block": -1, "metric": metric, "value": 99.0}
                )
    return pd.DataFrame(rows)


def test_divergence_heatmap_is_block_by_part_per_metric():
    fig = figures.plot_divergence_heatmap(_divergence())
    assert len(fig.axes) == 4  # two heatmaps, each with its colour bar
    meshes = _heatmaps(fig)
    assert len(meshes) == 2
    assert meshes[0].get_array().shape == (3, 3)  # blocks -1, 0, 1 by attn, mlp, head
    heat_axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in heat_axes] == ["update_cos", "weight_div"]
    assert [t.get_text() for t in heat_axes[0].get_xticklabels()] == ["attn", "mlp", "head"]
    assert [t.get_text() for t in heat_axes[0].get_yticklabels()] == ["-1", "0", "1"]
    values = np.ma.filled(meshes[0].get_array(), np.nan)
    assert values[1, 0] == 15.0 and values[2, 1] == 16.5  # mean over rounds 1 and 2
    assert np.isnan(values[0, 0]) and values[0, 2] == 1.5


def test_divergence_heatmap_can_show_the_last_round():
    values = np.ma.filled(
        _heatmaps(figures.plot_divergence_heatmap(_divergence(), rounds="last"))[0].get_array(), np.nan
    )
    assert values[1, 0] == 20.0 and values[0, 2] == 2.0
    with pytest.raises(ValueError, match="rounds"):
        figures.plot_divergence_heatmap(_divergence(), rounds="first")


def test_divergence_rounds_has_a_line_per_part_per_metric():
    fig = figures.plot_divergence_rounds(_divergence())
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert [line.get_label() for line in ax.get_lines()] == ["attn", "mlp", "head"]
        assert ax.get_xlabel() == "round"
    attn = fig.axes[0].get_lines()[0]
    assert list(attn.get_xdata()) == [1, 2] and list(attn.get_ydata()) == [10.5, 20.5]  # mean over blocks


def test_panel_figures_draw_into_given_axes_and_check_their_number():
    fig = Figure()
    axes = fig.subplots(1, 2)
    assert figures.plot_divergence_rounds(_divergence(), axes=axes) is fig
    with pytest.raises(ValueError, match="needs 2 axes"):
        figures.plot_divergence_rounds(_divergence(), axes=axes[:1])


def test_rank_agreement_plots_each_metric_with_its_spearman():
    ranking = _ranking({"update_cos": ["attn", "head", "mlp"], "cka": ["mlp", "head", "attn"]})
    fig = figures.plot_rank_agreement(ranking)
    (ax,) = fig.axes
    points = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(points) == 2 and all(len(c.get_offsets()) == 3 for c in points)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["update_cos (Spearman ρ = +1.00)", "cka (Spearman ρ = -1.00)"]
    # x: accuracy rank, dodged sideways per metric so that agreeing metrics stay visible
    x, y = points[1].get_offsets().T
    assert sorted(zip(np.round(x).astype(int), y.astype(int))) == [(1, 3), (2, 2), (3, 1)]
    assert np.allclose(x - np.round(x), 0.04) and np.allclose(points[0].get_offsets()[:, 0] % 1, 1 - 0.04)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1\nattn", "2\nhead", "3\nmlp"]


def test_rank_agreement_computes_spearman_when_the_column_is_absent():
    ranking = _ranking({"cka": ["mlp", "head", "attn"]}, with_rho=False)
    labels = [t.get_text() for t in figures.plot_rank_agreement(ranking).axes[0].get_legend().get_texts()]
    assert labels == ["cka (Spearman ρ = -1.00)"]


def _rounds() -> pd.DataFrame:
    rows = []
    for method, base in (("fedavg", 0.5), ("fedperfix", 0.6)):
        for seed in (0, 1):
            for round_ in (1, 2, 3):
                rows.append(
                    {
                        "method": method,
                        "seed": seed,
                        "round": round_,
                        "acc_mean": base + 0.1 * round_ + 0.02 * seed,
                        "acc_std": 0.05,
                        "acc_p10": base,
                    }
                )
    rows.append({"method": "fedavg", "seed": 0, "round": 4, "acc_mean": np.nan, "acc_std": np.nan, "acc_p10": np.nan})
    return pd.DataFrame(rows)


def test_training_curves_have_a_line_and_band_per_method():
    fig = figures.plot_training_curves(_rounds())
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["fedavg", "fedperfix"]
    assert np.allclose(lines[0].get_ydata(), [0.61, 0.71, 0.81])  # mean over seeds, unevaluated round dropped
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2
    low, high = bands[0].get_paths()[0].vertices[:, 1].min(), bands[0].get_paths()[0].vertices[:, 1].max()
    assert np.isclose(low, 0.56) and np.isclose(high, 0.86)
    assert ax.get_xlabel() == "round" and "accuracy" in ax.get_ylabel()
    assert ax.get_legend().get_title().get_text() == "method"


def test_training_curves_of_one_run_draw_into_a_given_axes():
    fig = Figure()
    ax = fig.add_subplot()
    rounds = _rounds().drop(columns=["method", "seed"]).head(3)
    assert figures.plot_training_curves(rounds, ax=ax) is fig
    assert len(ax.get_lines()) == 1 and ax.get_legend() is None


def _metrics() -> pd.DataFrame:
    rows = []
    for method, offset in (("fedavg", 0.0), ("fedper", 0.2)):
        for client in range(10):
            for round_, split in ((1, "test"), (2, "test"), (2, "train"), (3, "train")):
                accuracy = offset + client / 20 + (0.5 if split == "train" else 0.0) + 0.01 * round_
                rows.append(
                    {
                        "method": method,
                        "seed": 0,
                        "round": round_,
                        "client": client,
                        "split": split,
                        "loss": 1.0,
                        "accuracy": accuracy,
                        "n": 5,
                        "participated": True,
                    }
                )
    return pd.DataFrame(rows)


def test_final_client_accuracy_takes_each_runs_last_test_round():
    final = final_client_accuracy(_metrics())
    assert len(final) == 20 and set(final["round"]) == {2} and set(final["split"]) == {"test"}


def test_fairness_boxes_with_each_groups_p10_marked():
    final = final_client_accuracy(_metrics())
    fig = figures.plot_fairness(final)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fedavg", "fedper"]
    assert len(ax.patches) == 2  # one box per method
    (p10,) = [c for c in ax.collections if c.get_gid() == "p10"]
    expected = [np.quantile(final.loc[final["method"] == m, "accuracy"], 0.1) for m in ("fedavg", "fedper")]
    assert np.allclose(p10.get_offsets()[:, 1], expected)
    assert "accuracy" in ax.get_ylabel()
    assert any("p10" in t.get_text() for t in ax.get_legend().get_texts())


def test_cost_puts_each_method_on_both_axes():
    table = pd.DataFrame(
        {
            "method": ["fedavg", "fedavg", "local", "local"],
            "seed": [0, 1, 0, 1],
            "acc_mean": [0.6, 0.7, 0.8, 0.8],
            "comm_bytes_per_round": [2e6, 2e6, 0, 0],
            "local_params": [0, 0, 5000, 5000],
        }
    )
    fig = figures.plot_cost(table)
    assert len(fig.axes) == 2
    left, right = fig.axes
    assert "communication" in left.get_xlabel() and "local parameters" in right.get_xlabel()
    assert len(left.containers) == 2 and len(right.containers) == 2
    fedavg = left.containers[0].lines[0]
    assert fedavg.get_xdata()[0] == 2e6 and np.isclose(fedavg.get_ydata()[0], 0.65)
    assert right.containers[1].lines[0].get_xdata()[0] == 5000
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["fedavg", "local"]


def _partition(domains: bool) -> dict:
    return {
        "label_histogram": [[3, 0, 1], [0, 5, 2]],
        "classes": ["cat", "dog", "fox"],
        "domain_histogram": [[4, 0], [3, 4]] if domains else None,
        "domain_names": ["art", "photo"] if domains else [],
    }


def test_partition_counts_are_long_form():
    counts = partition_counts(_partition(domains=True))
    assert list(counts.columns) == ["client", "axis", "name", "count"]
    assert counts.groupby("axis")["count"].sum().to_dict() == {"class": 11, "domain": 11}
    assert counts.query("client == 1 and name == 'dog'")["count"].item() == 5


def test_partition_heatmap_is_clients_by_classes():
    fig = figures.plot_partition(partition_counts(_partition(domains=False)))
    assert len(fig.axes) == 2  # heatmap + colour bar
    (mesh,) = _heatmaps(fig)
    assert np.array_equal(mesh.get_array().reshape(2, 3), [[3, 0, 1], [0, 5, 2]])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "class" and ax.get_ylabel() == "client"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "fox"]


def test_partition_heatmap_adds_domains_when_there_are_any():
    fig = figures.plot_partition(partition_counts(_partition(domains=True)))
    assert len(fig.axes) == 4
    meshes = _heatmaps(fig)
    assert [m.get_array().size for m in meshes] == [6, 4]
    assert [ax.get_xlabel() for ax in fig.axes if ax.get_xlabel() in ("class", "domain")] == ["class", "domain"]


def test_critical_difference_places_parts_at_their_mean_rank_and_joins_unresolved_neighbours():
    ranking = _ranking({}).assign(
        mean_rank=[1.2, 2.3, 2.5], resolved_vs_next=[True, False, np.nan], friedman_p=[0.001] * 3
    )
    fig = figures.plot_critical_difference(ranking)
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["attn (1.20)", "head (2.30)", "mlp (2.50)"]
    bars = [line for line in ax.lines if line.get_linewidth() == 4]
    assert len(bars) == 1 and list(bars[0].get_xdata()) == [2.3, 2.5]  # head-mlp unresolved, attn-head resolved
    assert "Friedman p = 0.001" in ax.get_title()


def test_block_gains_draw_one_line_per_part_type_by_block():
    rows = [
        dict(part=f"{kind}@{b}", score=0.1 * b + (0.5 if kind == "mlp" else 0), ci_low=0, ci_high=1, rank=1)
        for kind in ("mlp", "attn")
        for b in (1, 0, 2)
    ]
    ranking = pd.DataFrame([*rows, dict(part="head", score=9.0, ci_low=0, ci_high=1, rank=1)]).assign(
        metric="gain_vs_fedavg"
    )
    (ax,) = figures.plot_block_gains(ranking).axes
    lines = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
    assert list(lines) == ["attn", "mlp"]  # model order; head (not per block) is not drawn
    assert list(lines["attn"].get_xdata()) == [0, 1, 2]
    assert list(np.round(lines["mlp"].get_ydata(), 6)) == [0.5, 0.6, 0.7]
