"""The probe: a planted effect is found, the command writes its tables beside a sweep and agrees with it
by Spearman, the report shows it, and `compare --from SWEEP` adds the sweep-placed FedPerfix row."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fedsens.cli import app
from fedsens.personalize import runio
from fedsens.personalize.errors import UserError
from fedsens.personalize.federation import RunConfig
from fedsens.personalize.ranks import spearman
from fedsens.personalize.schema import PROBE_COLUMNS, PROBE_METRIC, PROBE_RANKING_COLUMNS
from fedsens.reports.tables import read_folder
from fedsens.sensitivity.probe import ProbeConfig, fedavg_run, run_probe
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


def test_the_command_probes_a_sweep_and_ranks_against_it(sweep):
    result = CliRunner().invoke(app, ["probe", "--from", str(sweep), "--probe-steps", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "Spearman with the sweep's accuracy ranking" in result.output
    probe_dir = sweep / "probe"
    ranking = pd.read_csv(probe_dir / "probe_ranking.csv")
    assert list(ranking.columns) == PROBE_RANKING_COLUMNS and set(ranking["metric"]) == {PROBE_METRIC}
    summary = runio.read_json(probe_dir / "probe.json")
    # the sweep's FedAvg cell is reused, not trained again
    assert summary["fedavg_reused"] and not (probe_dir / "fedavg-s0").exists()
    expected = spearman(ranking.set_index("part")["score"], accuracy_order(pd.read_csv(sweep / "ranking.csv")))
    assert math.isfinite(expected)
    assert summary["spearman_vs_sweep"] == pytest.approx(expected)
    assert ranking["spearman_vs_gain"].iloc[0] == pytest.approx(expected)
    sweep_seconds = pd.read_csv(sweep / "rounds.csv")["seconds"].sum()
    assert summary["cost_fraction"] == pytest.approx(summary["seconds"] / sweep_seconds, rel=1e-6)
    # the report reads the probe as one more ranking source beside the divergence metrics
    frames = read_folder(sweep).frames
    assert (frames["ranking"]["metric"] == PROBE_METRIC).sum() == len(ranking)


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
