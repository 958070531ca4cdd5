"""The report on hand-made run / sweep / comparison folders laid out exactly as BRIEF.md says.

The `write_*_folder` builders are plain functions so other tests (the browser test, a test on a
tiny real sweep) can reuse them; `check_report` holds the checks any finished report must pass.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fedsens.cli import app
from fedsens.personalize.errors import UserError
from fedsens.reports.report import FIGURE_NAMES, build_report, detect, headline, plan_figures
from fedsens.reports.tables import read_folder

PARTS = ("embed", "attn", "mlp", "norm", "head")
METRICS = ("update_cos", "rel_drift", "weight_div", "cka")
ROUNDS, CLIENTS, CLASSES, BLOCKS = 3, 4, 4, 2


def write_run_folder(
    folder: Path,
    *,
    seed: int = 0,
    skill: float = 0.5,
    local_part: str = "none",
    domains: bool = False,
    divergence: bool = True,
) -> dict[str, pd.DataFrame]:
    """A run folder (config.json, partition.json, parts.csv, metrics.csv, rounds.csv, summary.json,
    divergence.csv); returns its tables so sweeps / comparisons can concatenate them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "config": {
            "dataset": "digits",
            "scheme": "dirichlet",
            "alpha": 0.5,
            "clients": CLIENTS,
            "rounds": ROUNDS,
            "personalize": local_part,
            "method": "fedavg",
            "seed": seed,
            "lr": 0.05,
        },
        "versions": {"torch": "2.14.1", "timm": "1.0"},
        "git_revision": None,
    }
    (folder / "config.json").write_text(json.dumps(config))
    histogram = rng.integers(0, 20, size=(CLIENTS, CLASSES))
    partition = {
        "params": {"scheme": "dirichlet", "alpha": 0.5, "num_clients": CLIENTS, "seed": seed},
        "seed": seed,
        "hash": "abc123",
        "train": [[0, 1]] * CLIENTS,
        "test": [[2]] * CLIENTS,
        "label_histogram": histogram.tolist(),
        "domain_histogram": rng.integers(0, 9, size=(CLIENTS, 2)).tolist() if domains else None,
        "classes": [f"c{i}" for i in range(CLASSES)],
        "domain_names": ["art", "photo"] if domains else [],
    }
    (folder / "partition.json").write_text(json.dumps(partition))
    parts = pd.DataFrame(
        [
            {
                "param": f"p{i}.{part}",
                "part": part,
                "block": i % BLOCKS,
                "numel": 100 * (i + 1),
                "bytes": 400 * (i + 1),
                "local": part == local_part,
            }
            for i, part in enumerate(PARTS)
        ]
    )
    metrics = pd.DataFrame(
        [
            {
                "round": r,
                "client": c,
                "split": split,
                "loss": 1.0 / r,
                "accuracy": float(np.clip(skill + 0.1 * r + rng.normal(0, 0.05), 0, 1)),
                "n": 10,
                "participated": bool((r + c) % 2),
            }
            for r in range(1, ROUNDS + 1)
            for c in range(CLIENTS)
            for split in ("train", "test")
        ]
    )
    test = metrics[metrics["split"] == "test"].groupby("round")["accuracy"]
    rounds = pd.DataFrame(
        {
            "round": range(1, ROUNDS + 1),
            "acc_mean": test.mean().to_numpy(),
            "acc_std": test.std().to_numpy(),
            "acc_p10": test.quantile(0.1).to_numpy(),
            "acc_min": test.min().to_numpy(),
            "jain": 0.95,
            "up_bytes": 4000,
            "down_bytes": 4000,
            "seconds": 0.5,
        }
    )
    summary = {
        "acc_best": float(rounds["acc_mean"].max()),
        "acc_last": float(rounds["acc_mean"].iloc[-1]),
        "round_best": int(rounds["acc_mean"].idxmax()) + 1,
        "rounds": ROUNDS,
        "seconds": 1.5,
        "seconds_per_round": 0.5,
        "local_params": int(parts[parts["local"]]["numel"].sum()),
        "shared_params": int(parts[~parts["local"]]["numel"].sum()),
        "comm_bytes_per_round": 8000,
        "status": "done",
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    tables = {"parts": parts, "metrics": metrics, "rounds": rounds}
    if divergence:
        groups = pd.DataFrame(
            [
                {
                    "round": r,
                    "group": f"blocks.{b}.{part}" if b >= 0 else part,
                    "part": part,
                    "block": b,
                    "metric": metric,
                    "value": float(rng.uniform()),
                }
                for r in range(1, ROUNDS + 1)
                for metric in METRICS
                for part in PARTS
                for b in ((-1,) if part in ("embed", "head") else range(BLOCKS))
            ]
        )
        # divergence.py also writes each part's mean over its groups as a row with group = part.
        summaries = groups[groups["block"] >= 0].groupby(["round", "part", "metric"], as_index=False)["value"].mean()
        summaries = summaries.assign(group=summaries["part"], block=-1)[groups.columns]
        tables["divergence"] = pd.concat([groups, summaries], ignore_index=True)
    for name, table in tables.items():
        table.to_csv(folder / f"{name}.csv", index=False)
    return tables


def _concatenate(per_run: list[tuple[dict, dict[str, pd.DataFrame]]], name: str) -> pd.DataFrame:
    """A top-level table: each run's table with the run's identifying columns in front."""
    pieces = [table[name].assign(**keys)[[*keys, *table[name].columns]] for keys, table in per_run if name in table]
    return pd.concat(pieces, ignore_index=True)


def write_sweep_folder(folder: Path, *, parts=("none", *PARTS, "all"), seeds=(0, 1), alphas=(0.5,)) -> Path:
    """A sweep folder: sweep.json, cells/<cell>/, sensitivity.csv, ranking.csv and concatenated tables.

    As sensitivity/ranking.py writes it: one block of ranking rows per partition, `none` not ranked
    and `all` in the gain block with rank NaN and no divergence rows.
    """
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "run": {"dataset": "digits", "scheme": "dirichlet", "rounds": ROUNDS},
        "parts": list(parts),
        "seeds": list(seeds),
        "alphas": list(alphas),
    }
    (folder / "sweep.json").write_text(json.dumps(config))
    per_run, rows = [], []
    for alpha, seed, local_part in itertools.product(alphas, seeds, parts):
        cell = f"digits-dirichlet-a{alpha:g}-s{seed}-{local_part}"
        skill = 0.4 + 0.03 * parts.index(local_part) - alpha / 10
        tables = write_run_folder(folder / "cells" / cell, seed=seed, skill=skill, local_part=local_part)
        keys = {
            "cell": cell,
            "local_part": local_part,
            "seed": seed,
            "dataset": "digits",
            "scheme": "dirichlet",
            "alpha": alpha,
        }
        per_run.append((keys, tables))
        last = tables["rounds"].iloc[-1]
        rows.append(
            {
                "dataset": "digits",
                "scheme": "dirichlet",
                "alpha": alpha,
                "seed": seed,
                "local_part": local_part,
                "status": "done",
                "acc_mean": last["acc_mean"],
                "acc_std": last["acc_std"],
                "acc_p10": last["acc_p10"],
                "acc_last": last["acc_mean"],
                "acc_best": last["acc_mean"],
                "local_params": 100 * parts.index(local_part),
                "comm_bytes_per_round": 8000 - 300 * parts.index(local_part),
                "cell": cell,
                "rounds": ROUNDS,
            }
        )
    sensitivity = pd.DataFrame(rows)
    fedavg = sensitivity[sensitivity["local_part"] == "none"].set_index(["alpha", "seed"])["acc_mean"]
    reference = pd.MultiIndex.from_frame(sensitivity[["alpha", "seed"]])
    sensitivity["gain_vs_fedavg"] = sensitivity["acc_mean"].to_numpy() - fedavg.reindex(reference).to_numpy()
    sensitivity["comm_saved"] = 1 - sensitivity["comm_bytes_per_round"] / 8000
    sensitivity.to_csv(folder / "sensitivity.csv", index=False)
    ranking = []
    for alpha in alphas:
        partition = {"dataset": "digits", "scheme": "dirichlet", "alpha": alpha}
        table = sensitivity[(sensitivity["alpha"] == alpha) & (sensitivity["local_part"] != "none")]
        gains = table.groupby("local_part", sort=False)["gain_vs_fedavg"].mean().sort_values(ascending=False)
        ranked = [part for part in gains.index if part != "all"]
        ranking += [
            {
                "part": part,
                "score": score,
                "ci_low": score - 0.02,
                "ci_high": score + 0.02,
                "rank": ranked.index(part) + 1 if part in ranked else np.nan,
                "metric": "gain_vs_fedavg",
                "spearman_vs_gain": np.nan,
                "mean_rank": ranked.index(part) + 1.5 if part in ranked else np.nan,
                "friedman_p": 0.01,
                "resolved_vs_next": part == ranked[0],
                **partition,
            }
            for part, score in gains.items()
        ]
        for shift, metric in enumerate(METRICS):
            order = np.roll(ranked, shift)
            ranking += [
                {
                    "part": part,
                    "score": 1.0 / (i + 1),
                    "ci_low": np.nan,
                    "ci_high": np.nan,
                    "rank": i + 1,
                    "metric": metric,
                    "spearman_vs_gain": 1.0 - 0.3 * shift,
                    **partition,
                }
                for i, part in enumerate(order)
            ]
    pd.DataFrame(ranking).to_csv(folder / "ranking.csv", index=False)
    for name in ("rounds", "metrics", "divergence"):
        _concatenate(per_run, name).to_csv(folder / f"{name}.csv", index=False)
    return folder


def write_comparison_folder(folder: Path, *, methods=("fedavg", "fedper", "fedperfix"), seeds=(0, 1)) -> Path:
    """A comparison folder: compare.json, runs/<method>-s<seed>/, comparison.csv, summary.csv and
    concatenated rounds.csv / metrics.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "compare.json").write_text(
        json.dumps({"dataset": "digits", "methods": list(methods), "seeds": list(seeds), "rounds": ROUNDS})
    )
    per_run, rows = [], []
    for index, method in enumerate(methods):
        for seed in seeds:
            tables = write_run_folder(
                folder / "runs" / f"{method}-s{seed}",
                seed=seed,
                skill=0.4 + 0.05 * index,
                domains=True,
                divergence=False,
            )
            per_run.append(({"method": method, "seed": seed}, tables))
            rounds = tables["rounds"]
            rows.append(
                {
                    "method": method,
                    "seed": seed,
                    "acc_mean": rounds["acc_mean"].iloc[-1],
                    "acc_std": rounds["acc_std"].iloc[-1],
                    "acc_p10": rounds["acc_p10"].iloc[-1],
                    "local_params": 250 * index,
                    "comm_bytes_per_round": 8000 - 1000 * index,
                    "seconds": 1.5,
                    "acc_best": rounds["acc_mean"].max(),
                    "protocol": "after-aggregation",
                }
            )
    comparison = pd.DataFrame(rows)
    comparison.to_csv(folder / "comparison.csv", index=False)
    summary = comparison.groupby("method", sort=False)["acc_mean"].agg(["mean", "std"]).reset_index()
    summary["accuracy"] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(summary["mean"], summary["std"])]
    summary[["method", "accuracy"]].to_csv(folder / "summary.csv", index=False)
    for name in ("rounds", "metrics"):
        _concatenate(per_run, name).to_csv(folder / f"{name}.csv", index=False)
    return folder


EXPECTED_FIGURES = {
    "run": {"training_curves", "fairness", "divergence_heatmap", "divergence_rounds", "partition"},
    "sweep": {
        "sensitivity",
        "critical_difference",
        "rank_agreement",
        "divergence_heatmap",
        "divergence_rounds",
        "training_curves",
        "fairness",
        "cost",
        "partition",
    },
    "comparison": {"training_curves", "fairness", "cost", "partition"},
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_report(folder: Path, expected_figures: set[str]) -> str:
    """What every report must be: each figure as PNG + SVG, embedded in one offline HTML file."""
    out = folder / "report"
    html = (out / "index.html").read_text(encoding="utf-8")
    for name in expected_figures:
        assert (out / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE), name
        assert (out / f"{name}.svg").read_text().lstrip().startswith("<?xml"), name
        assert f'id="{name}"' in html, name
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) == len(expected_figures)
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1]).startswith(PNG_SIGNATURE)
    # Self-contained: nothing fetched, nothing run.
    assert "<script" not in html and "<link" not in html and "url(" not in html
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert html.count("<figcaption>") == len(expected_figures)
    markdown = (out / "report.md").read_text(encoding="utf-8")
    for name in expected_figures:
        assert f"]({name}.png)" in markdown
    return html


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    run = root / "run"
    write_run_folder(run)
    return {
        "run": run,
        "sweep": write_sweep_folder(root / "sweep"),
        "comparison": write_comparison_folder(root / "comparison"),
    }


@pytest.fixture(scope="module")
def reports(folders) -> dict[str, str]:
    """Each folder's report, built once: kind -> index.html's text."""
    return {kind: build_report(folder, quiet=True).read_text(encoding="utf-8") for kind, folder in folders.items()}


@pytest.mark.parametrize("kind", ["run", "sweep", "comparison"])
def test_detect_tells_the_three_folders_apart(folders, kind):
    assert detect(folders[kind]) == kind


def test_detect_names_what_it_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    with pytest.raises(UserError, match="comparison.csv.*sensitivity.csv.*config.json"):
        detect(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        detect(tmp_path / "nowhere")


def test_detect_says_when_a_sweep_is_unfinished(tmp_path):
    (tmp_path / "sweep.json").write_text("{}")
    with pytest.raises(UserError, match="unfinished sweep: sensitivity.csv"):
        detect(tmp_path)


def test_every_figure_name_is_known_to_the_stale_file_cleanup():
    per_block = {"block_gains"}  # drawn only for --per-block sweeps (tests/test_figures.py draws it)
    assert set().union(*EXPECTED_FIGURES.values(), per_block) == set(FIGURE_NAMES)


@pytest.mark.parametrize("kind", ["run", "sweep", "comparison"])
def test_report_has_every_figure_its_tables_allow(folders, reports, kind):
    html = check_report(folders[kind], EXPECTED_FIGURES[kind])
    assert html == reports[kind]
    assert 'class="note"' not in html  # nothing was missing
    assert "<h2>Configuration" in html and re.search(r"<td>(\w+\.)?dataset</td>\s*<td>digits</td>", html)


def test_sweep_report_leads_with_the_ranking(folders, reports):
    html = reports["sweep"]
    ranking = pd.read_csv(folders["sweep"] / "ranking.csv")
    gains = ranking[ranking["metric"] == "gain_vs_fedavg"].sort_values("rank", na_position="last")
    ranked = gains.dropna(subset=["rank"])
    lead = re.search(r'<p class="lead">(.*?)</p>', html).group(1)
    assert lead.startswith(f"Most sensitive part: {ranked['part'].iloc[0]}")
    assert "Ranking: " + " &gt; ".join(ranked["part"]) + ". Not ranked: all" in lead
    assert html.index('class="lead"') < html.index("<img")
    assert "Spearman correlation" in html and "update_cos +1.00" in html
    table = re.search(r"<h3>by accuracy gain over FedAvg.*?</table>", html, re.S).group(0)
    assert table.count("<tr") == len(gains) + 1


def test_comparison_report_names_the_best_method(folders, reports):
    comparison = pd.read_csv(folders["comparison"] / "comparison.csv")
    best = comparison.groupby("method")["acc_mean"].mean().idxmax()
    assert f"Best final-round mean client accuracy: {best}" in reports["comparison"]
    assert "Best round per method (chosen on the test data" in reports["comparison"]
    assert "after-aggregation evaluation protocol" in reports["comparison"]
    assert "samples per client and domain" in (folders["comparison"] / "report" / "partition.svg").read_text()


def test_comparison_of_one_seed_gives_no_spread(tmp_path):
    comparison = write_comparison_folder(tmp_path / "comparison", methods=("fedavg", "local"), seeds=(0,))
    (lead,) = [block.text for block in headline(read_folder(comparison)) if block.lead]
    assert lead.startswith("Best final-round mean client accuracy: local ") and "±" not in lead and "nan" not in lead


def test_run_report_shows_its_summary_and_parts(folders, reports):
    summary = json.loads((folders["run"] / "summary.json").read_text())
    assert f"Final mean client accuracy {summary['acc_last']:.4f}" in reports["run"]
    assert "parameters per part (parts.csv)" in reports["run"]


def test_sweep_over_two_partitions_ranks_each(tmp_path):
    sweep = write_sweep_folder(
        tmp_path / "sweep", parts=("none", "attn", "mlp", "head", "all"), seeds=(0,), alphas=(0.1, 1.0)
    )
    planned, notes = plan_figures(read_folder(sweep))
    names = [plan.name for plan in planned]
    assert names[:6] == [
        "sensitivity-digits_dirichlet_0.1",
        "critical_difference-digits_dirichlet_0.1",
        "rank_agreement-digits_dirichlet_0.1",
        "sensitivity-digits_dirichlet_1",
        "critical_difference-digits_dirichlet_1",
        "rank_agreement-digits_dirichlet_1",
    ]
    assert notes == []
    bars = next(plan for plan in planned if plan.name.startswith("sensitivity")).draw()
    labels = [t.get_text() for t in bars.axes[0].get_yticklabels()]
    assert len(labels) == 4 and labels[-1] == "all (not ranked)"
    leads = [block.text for block in headline(read_folder(sweep)) if block.lead]
    assert [lead.split(":")[0] for lead in leads] == ["digits/dirichlet/0.1", "digits/dirichlet/1"]
    assert all("one seed: no interval" not in lead and "Not ranked: all" in lead for lead in leads)


def test_missing_tables_leave_a_note_not_a_crash(tmp_path):
    run = tmp_path / "run"
    write_run_folder(run, divergence=False)
    (run / "metrics.csv").unlink()
    (run / "partition.json").unlink()
    html = build_report(run, quiet=True).read_text()
    check_report(run, {"training_curves"})
    notes = re.findall(r'<p class="note">(.*?)</p>', html)
    assert len(notes) == 3
    assert any("divergence.csv" in note for note in notes)
    assert any("metrics.csv" in note and "fairness" in note for note in notes)
    assert any("partition.json" in note for note in notes)
    assert "> Note: metrics.csv" in (run / "report" / "report.md").read_text()


def test_run_without_an_evaluated_round_still_reports(tmp_path):
    run = tmp_path / "run"
    write_run_folder(run, divergence=False)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "acc_last": None, "acc_best": None}))
    rounds = pd.read_csv(run / "rounds.csv")
    rounds.loc[rounds["round"] == ROUNDS, "acc_mean"] = np.nan
    rounds.to_csv(run / "rounds.csv", index=False)
    html = build_report(run, quiet=True).read_text()
    assert f"Mean client accuracy {rounds['acc_mean'].iloc[-2]:.4f} at round {ROUNDS - 1}" in html


def test_unfinished_sweep_reports_what_it_has(tmp_path):
    sweep = write_sweep_folder(tmp_path / "sweep", parts=("none", "attn"), seeds=(0,))
    (sweep / "ranking.csv").unlink()
    (sweep / "divergence.csv").unlink()
    html = build_report(sweep, quiet=True).read_text()
    check_report(sweep, {"training_curves", "fairness", "cost", "partition"})
    assert "no ranking.csv yet" in html


def test_failed_cells_are_left_out_of_the_cost_figure(tmp_path):
    sweep = write_sweep_folder(tmp_path / "sweep", parts=("none", "attn", "head"), seeds=(0,))
    sensitivity = pd.read_csv(sweep / "sensitivity.csv")
    sensitivity.loc[sensitivity["local_part"] == "head", ["status", "acc_mean"]] = ["failed", np.nan]
    sensitivity.to_csv(sweep / "sensitivity.csv", index=False)
    planned, _ = plan_figures(read_folder(sweep))
    cost = next(plan for plan in planned if plan.name == "cost").draw()
    assert [text.get_text() for text in cost.axes[1].get_legend().get_texts()] == ["none", "attn"]


def test_rebuilding_removes_figures_that_no_longer_apply(tmp_path):
    run = tmp_path / "run"
    write_run_folder(run)
    (run / "metrics.csv").unlink()
    (run / "partition.json").unlink()
    build_report(run, quiet=True)
    assert (run / "report" / "divergence_heatmap.svg").exists()
    (run / "divergence.csv").unlink()
    build_report(run, quiet=True)
    assert not (run / "report" / "divergence_heatmap.png").exists()
    assert not (run / "report" / "divergence_heatmap.svg").exists()
    check_report(run, {"training_curves"})


def test_cli_writes_the_report_and_opens_it(folders, monkeypatch):
    opened = []
    monkeypatch.setattr("webbrowser.open", opened.append)
    result = CliRunner().invoke(app, ["report", str(folders["comparison"]), "--open", "--quiet"])
    assert result.exit_code == 0, result.output
    index = folders["comparison"] / "report" / "index.html"
    assert str(index) in result.output and "KiB" in result.output
    assert opened == [index.resolve().as_uri()]


def test_cli_rejects_a_folder_that_is_no_report_source(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "error:" in result.output and "sensitivity.csv" in result.output
