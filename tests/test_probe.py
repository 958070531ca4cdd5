"""The probe: a planted effect is found, the command writes its tables beside a sweep and agrees with it
by Spearman, the report shows it, and `compare --from SWEEP` adds the sweep-placed FedPerfix row."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fedsens.cli import app
from fedsens.commands.probe import build_config, ranking_text
from fedsens.personalize import runio
from fedsens.personalize.errors import UserError
from fedsens.personalize.federation import RunConfig
from fedsens.personalize.federation import run as train_run
from fedsens.personalize.ranks import spearman
from fedsens.personalize.schema import PROBE_COLUMNS, PROBE_METRIC, PROBE_RANKING_COLUMNS
from fedsens.reports.report import probe_agreement_text
from fedsens.reports.tables import read_folder
from fedsens.sensitivity.probe import ProbeConfig, distinguishable, fedavg_run, probe_ranking, run_probe
from fedsens.sensitivity.probe_variants import continued_accuracy, seed_probe
from fedsens.sensitivity.ranking import accuracy_order
from fedsens.sensitivity.sweep import SweepConfig, run_sweep

TINY_RUN = RunConfig(
    dataset="synthetic",
    model="vit-nano",
    clients=4,
    join_ratio=1.0,
    rounds=3,
    local_epochs=1,
    device="cpu",
)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A tiny finished sweep with three ranked parts (a Spearman needs three)."""
    out = tmp_path_factory.mktemp("probe") / "sweep"
    parts = ("none", "attn", "mlp", "head")
    # force: three rounds may teach the reference little (test_sanity.py); the probe needs only the tables
    run_sweep(SweepConfig(run=TINY_RUN, parts=parts, seeds=(0,), div_every=3, out=str(out), quiet=True, force=True))
    return out


def test_a_planted_head_effect_is_found(tmp_path):
    """The federated model's head is zeroed: every logit is 0, so no gradient reaches the parts behind the
    head and only fine-tuning the head itself can change a prediction. The probe must rank the head first,
    its interval above zero, and measure no gain at all for the other parts."""
    config = ProbeConfig(run=TINY_RUN, seeds=(0,), probe_steps=15, out=str(tmp_path / "probe"), quiet=True)
    folder, reused = fedavg_run(config, 0)
    assert not reused and (folder / "checkpoint.pt").is_file()
    state = runio.load_checkpoint(folder / "checkpoint.pt")
    for name in ("head.weight", "head.bias"):
        state["shared"][name] = torch.zeros_like(state["shared"][name])
    runio.save_checkpoint(folder / "checkpoint.pt", state)

    result = run_probe(config)
    ranking = result.ranking.set_index("part")
    assert list(result.probe.columns) == PROBE_COLUMNS and list(result.ranking.columns) == PROBE_RANKING_COLUMNS
    assert len(result.probe) == TINY_RUN.clients * 5  # every client x every part type
    assert result.ranking["part"].iloc[0] == "head"
    assert ranking.loc["head", "ci_low"] > 0
    others = result.probe[result.probe["part"] != "head"]
    assert (others["gain"] == 0).all() and (others["before"] == others["after"]).all()
    assert (result.probe["gain"] == result.probe["after"] - result.probe["before"]).all()
    assert result.summary["fedavg_reused"] == [] and "spearman_vs_sweep" not in result.summary
    # every client gains from the head alone and from nothing else: the order is resolved and printed
    assert result.summary["distinguishable"] and result.summary["friedman_p"] < 0.05
    assert ranking.loc["head", "resolved_vs_next"] == True  # noqa: E712 (a pandas object column)
    assert "probe order: head > " in ranking_text(result)

    # Without the head no probed part can change a prediction: every gain is exactly zero, and the probe
    # says it cannot order the parts instead of printing one.
    shutil.copytree(folder, tmp_path / "blind" / "fedavg-s0")  # the same zeroed head
    blind = run_probe(dataclasses.replace(config, parts=("embed", "attn", "mlp"), out=str(tmp_path / "blind")))
    assert (blind.probe["gain"] == 0).all() and not blind.summary["distinguishable"]
    text = ranking_text(blind)
    assert "NO ORDER" in text and "probe order:" not in text


def test_the_command_probes_a_sweep_and_ranks_against_it(sweep):
    result = CliRunner().invoke(app, ["probe", "--from", str(sweep), "--probe-steps", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "measured agreement with this sweep: Spearman" in result.output
    probe_dir = sweep / "probe"
    ranking = pd.read_csv(probe_dir / "probe_ranking.csv")
    assert list(ranking.columns) == PROBE_RANKING_COLUMNS and set(ranking["metric"]) == {PROBE_METRIC}
    summary = runio.read_json(probe_dir / "probe.json")
    # the sweep's FedAvg cell is reused, not trained again
    assert summary["fedavg_reused"] and not (probe_dir / "fedavg-s0").exists()
    expected = spearman(ranking.set_index("part")["score"], accuracy_order(pd.read_csv(sweep / "ranking.csv")))
    assert math.isfinite(expected)
    assert summary["spearman_vs_sweep"] == pytest.approx(expected)
    sweep_top = accuracy_order(pd.read_csv(sweep / "ranking.csv")).index[0]
    assert summary["same_top_part"] == (ranking.sort_values("rank")["part"].iloc[0] == sweep_top)
    # an order is printed only when the probe's parts are distinguishable, else the reason instead
    assert ("probe order:" in result.output) == summary["distinguishable"]
    assert ("NO ORDER" in result.output) == (not summary["distinguishable"])
    assert ranking["spearman_vs_gain"].iloc[0] == pytest.approx(expected)
    sweep_seconds = pd.read_csv(sweep / "rounds.csv")["seconds"].sum()
    assert summary["cost_fraction"] == pytest.approx(summary["seconds"] / sweep_seconds, rel=1e-6)
    # the report reads the probe as one more ranking source beside the divergence metrics, and says how far
    # it agrees with the sweep and whether its own parts are distinguishable
    tables = read_folder(sweep)
    assert (tables.frames["ranking"]["metric"] == PROBE_METRIC).sum() == len(ranking)
    rows = tables.frames["ranking"]
    ranked = rows[(rows["metric"] == "gain_vs_fedavg") & rows["rank"].notna()].sort_values("rank")
    said = probe_agreement_text(rows[rows["metric"] == PROBE_METRIC], ranked)
    assert f"The probe against this sweep: Spearman {expected:+.2f}" in said
    assert ("NOT distinguishable" in said) == (not summary["distinguishable"])
    assert ("is the sweep's" in said) == summary["same_top_part"]


def test_bad_input_is_one_line(sweep, tmp_path):
    runner = CliRunner()
    with_knob = runner.invoke(app, ["probe", "--from", str(sweep), "--rounds", "2", "--out", str(tmp_path / "p")])
    assert with_knob.exit_code == 2 and "drop --rounds" in with_knob.output
    no_sweep = runner.invoke(app, ["probe", "--from", str(tmp_path), "--out", str(tmp_path / "p")])
    assert no_sweep.exit_code == 2 and "no sweep.json" in no_sweep.output
    with pytest.raises(UserError, match="--probe-steps"):
        ProbeConfig(run=TINY_RUN, probe_steps=0)
    with pytest.raises(UserError, match="--parts"):
        ProbeConfig(run=TINY_RUN, parts=("plugin",))
    bad_variant = runner.invoke(app, ["probe", "--from", str(sweep), "--variant", "oracle", "--out", str(tmp_path)])
    assert bad_variant.exit_code == 2 and "--variant takes one of finetune, fork, disagreement" in bad_variant.output
    with pytest.raises(UserError, match="--fork-rounds"):
        ProbeConfig(run=TINY_RUN, variant="fork", fork_rounds=0)


def test_seeds_all_takes_the_sweeps_seeds(sweep, tmp_path):
    folder = tmp_path / "two-seeds"
    folder.mkdir()
    record = json.loads((sweep / "sweep.json").read_text())
    (folder / "sweep.json").write_text(json.dumps({**record, "seeds": [3, 5]}))
    common = dict(run={}, parts=None, probe_steps=1, out=None)
    assert build_config(sweep=str(folder), seeds="all", **common).seeds == (3, 5)
    assert build_config(sweep=str(folder), seeds=None, **common).seeds == (3,)
    assert build_config(sweep=None, seeds="all", **common).seeds == (0, 1, 2)  # the quick sweep's


def _probe_table(gains: dict[str, list[float]]) -> pd.DataFrame:
    rows = [
        dict(dataset="d", scheme="s", alpha=0.3, seed=0, client=c, part=part, before=0.0, after=g, gain=g, steps=1)
        for part, values in gains.items()
        for c, g in enumerate(values)
    ]
    return pd.DataFrame(rows)


def test_the_order_is_claimed_only_when_friedman_and_the_top_pair_say_so():
    rng = np.random.default_rng(0)
    noise = {part: list(rng.normal(0, 0.05, 20)) for part in ("embed", "attn", "mlp")}
    assert not distinguishable(probe_ranking(_probe_table(noise)))["distinguishable"]
    clear = {**noise, "head": list(np.array(noise["mlp"]) + 0.2)}
    verdict = distinguishable(probe_ranking(_probe_table(clear)))
    assert verdict["distinguishable"] and verdict["friedman_p"] < 0.05
    # the parts differ (Friedman) but the two best do not: still no order
    tied_top = {**clear, "attn": list(np.array(clear["head"]) + rng.normal(0, 0.01, 20))}
    verdict = distinguishable(probe_ranking(_probe_table(tied_top)))
    assert verdict["friedman_p"] < 0.05 and not verdict["distinguishable"]
    assert "not resolved from the next" in verdict["why_not"]


def test_a_fedavg_fork_is_the_runs_own_continuation(tmp_path):
    """The fork variant continues the run from its checkpoint with the engine's own round: FedAvg forked for
    two rounds gives every client exactly the accuracy the run itself reaches when extended by two rounds."""
    config = ProbeConfig(run=TINY_RUN, variant="fork", fork_rounds=2, out=str(tmp_path / "probe"), quiet=True)
    folder, _ = fedavg_run(config, 0)
    probe = seed_probe(
        config.run.replace(seed=0), folder, tmp_path / "probe", variant="fork", parts=("head",), steps=1, fork_rounds=2
    )
    forked = continued_accuracy(probe, "none")
    extended = train_run(
        config.run.replace(seed=0, rounds=TINY_RUN.rounds + 2, out=str(folder)), resume=True, quiet=True
    )
    metrics = extended.metrics
    after = metrics[(metrics["protocol"] == "after-aggregation") & (metrics["round"] > TINY_RUN.rounds)]
    expected = after.pivot_table(index="client", columns="round", values="accuracy").to_numpy()
    assert forked.shape == (TINY_RUN.clients, 2)
    np.testing.assert_allclose(forked, expected, atol=1e-6)


def test_the_fork_variant_scores_each_part_against_the_fedavg_fork(tmp_path):
    config = ProbeConfig(
        run=TINY_RUN, variant="fork", fork_rounds=1, parts=("mlp", "head"), out=str(tmp_path / "p"), quiet=True
    )
    result = run_probe(config)
    probe = result.probe
    assert len(probe) == TINY_RUN.clients * 2 and (probe["steps"] == 1).all()
    # every part of a client is set against the same FedAvg fork
    assert (probe.groupby("client")["before"].nunique() == 1).all()
    assert np.allclose(probe["gain"], probe["after"] - probe["before"])
    assert result.summary["variant"] == "fork" and "fork" in ranking_text(result)


def test_the_disagreement_variant_is_one_minus_the_cosine_with_the_mean(tmp_path):
    config = ProbeConfig(run=TINY_RUN, variant="disagreement", probe_steps=2, out=str(tmp_path / "p"), quiet=True)
    result = run_probe(config)
    probe = result.probe
    assert len(probe) == TINY_RUN.clients * 5
    assert ((probe["gain"] >= 0) & (probe["gain"] <= 2)).all() and probe["before"].isna().all()
    assert (probe.groupby("part")["gain"].std() > 0).all()  # clients pull the parts differently


def test_compare_from_a_sweep_adds_the_placed_fedperfix(sweep, tmp_path):
    out = tmp_path / "compare"
    args = ["compare", "--methods", "fedperfix", "--from", str(sweep), "--top-blocks", "1", "--dataset", "synthetic"]
    args += ["--model", "vit-nano", "--rounds", "1", "--clients", "3", "--local-steps", "2", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--seeds", "0", "--out", str(out), "--quiet", "-o", "mid_dim=8"])
    assert result.exit_code == 0, result.output
    comparison = pd.read_csv(out / "comparison.csv")
    assert list(comparison["method"]) == ["fedperfix", "fedperfix-placed"]
    assert (comparison["status"] == "done").all()
    placement = runio.read_json(out / "placement.json")
    placed = runio.read_json(out / "runs" / "fedperfix-placed-s0" / "config.json")["config"]
    assert placed["method"] == "fedperfix"
    assert placed["method_options"]["blocks"] == ",".join(map(str, placement["blocks"]))
    assert placed["method_options"]["mid_dim"] == 8  # the shared options reach the variant too
    plain = runio.read_json(out / "runs" / "fedperfix-s0" / "config.json")["config"]
    assert plain["method_options"]["blocks"] != placed["method_options"]["blocks"]
    assert (
        comparison.set_index("method").loc["fedperfix-placed", "local_params"]
        < (comparison.set_index("method").loc["fedperfix", "local_params"])
    )
    lone = CliRunner().invoke(app, ["compare", "--top-blocks", "2", "--out", str(tmp_path / "x")])
    assert lone.exit_code == 2 and "--from" in lone.output
