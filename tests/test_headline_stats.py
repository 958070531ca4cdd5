"""The statistics use the headline protocol's rows: metrics.csv records both evaluation protocols for every
client and round, and every interval, test and per-client figure must describe the score it stands beside.

The invariant: the grand mean of a part's per-(seed, client) gains equals the part's score in ranking.csv
(the mean over seeds of the cells' tail gains, from rounds.csv's headline columns)."""

from __future__ import annotations

import pandas as pd
import pytest

from fedsens.personalize.federation import RunConfig
from fedsens.sensitivity import stats
from fedsens.sensitivity.compare import CompareConfig, run_compare
from fedsens.sensitivity.probe import ProbeConfig, run_probe
from fedsens.sensitivity.sweep import SweepConfig, run_sweep

# join_ratio 0.5: the participants' paper rows (before aggregation) differ from their after-aggregation rows
TINY_RUN = RunConfig(
    dataset="synthetic", model="vit-nano", clients=4, join_ratio=0.5, rounds=4, local_epochs=1, device="cpu"
)


@pytest.fixture(scope="module", params=["after-aggregation", "paper"])
def sweep(request, tmp_path_factory):
    run = TINY_RUN.replace(eval_protocol=request.param)
    out = tmp_path_factory.mktemp("headline") / "sweep"
    config = SweepConfig(run=run, parts=("none", "attn", "head"), seeds=(0, 1), out=str(out), quiet=True, force=True)
    return request.param, run_sweep(config)


def test_the_two_protocols_differ_in_these_settings(sweep):
    """Otherwise the invariant below could not tell the headline rows from a mix of both."""
    _, result = sweep
    metrics = result.tables["metrics"]
    wide = metrics.pivot_table(index=["cell", "round", "client"], columns="protocol", values="accuracy")
    assert (wide["paper"] - wide["after-aggregation"]).abs().max() > 0


def test_the_grand_mean_of_the_per_client_gains_is_the_cells_score(sweep):
    protocol, result = sweep
    assert set(result.tables["rounds"]["protocol"]) == {protocol}
    headline = stats.headline_protocols(result.tables["rounds"])
    assert set(headline.values()) == {protocol} and len(headline) == len(result.sensitivity)
    gains = stats.paired_gains(stats.client_outcomes(result.tables["metrics"], headline))
    block = result.ranking[result.ranking["metric"] == "gain_vs_fedavg"].set_index("part")
    for part in ("attn", "head"):
        assert gains.loc[gains["local_part"] == part, "gain"].mean() == pytest.approx(block.loc[part, "score"])
        matrix = stats.seed_client_matrix(gains, part)
        assert matrix.shape == (2, TINY_RUN.clients)
        assert block.loc[part, "boot_low"] <= block.loc[part, "score"] <= block.loc[part, "boot_high"]
    # the per-cell tail accuracies themselves, not only their differences
    outcomes = stats.client_outcomes(result.tables["metrics"], headline)
    per_cell = outcomes.groupby(["seed", "local_part"])["acc_tail"].mean()
    table = result.sensitivity.set_index(["seed", "local_part"])["acc_tail"]
    pd.testing.assert_series_equal(per_cell.sort_index(), table.sort_index(), check_names=False)


def test_a_table_with_both_protocols_and_no_headline_is_refused(sweep):
    _, result = sweep
    with pytest.raises(ValueError, match="several protocols"):
        stats.client_outcomes(result.tables["metrics"])


def test_the_probe_score_is_the_mean_of_its_per_client_gains(tmp_path):
    config = ProbeConfig(run=TINY_RUN, seeds=(0, 1), probe_steps=3, out=str(tmp_path / "probe"), quiet=True)
    result = run_probe(config)
    per_client = result.probe.groupby(["part", "seed", "client"])["gain"].mean().groupby("part").mean()
    ranking = result.ranking.set_index("part")
    for part, mean in per_client.items():
        assert ranking.loc[part, "score"] == pytest.approx(mean)
        assert ranking.loc[part, "ci_low"] <= mean <= ranking.loc[part, "ci_high"]


@pytest.mark.parametrize("protocol", ["after-aggregation", "paper"])
def test_the_comparison_accuracy_is_the_mean_of_the_headline_client_rows(tmp_path, protocol):
    run = TINY_RUN.replace(rounds=2, eval_protocol=protocol)
    # force: two rounds teach the reference nothing (test_sanity.py)
    config = CompareConfig(
        run=run, methods=("fedavg", "fedper"), seeds=(0,), out=str(tmp_path / "c"), quiet=True, force=True
    )
    result = run_compare(config)
    metrics = pd.read_csv(tmp_path / "c" / "metrics.csv")
    assert set(metrics["protocol"]) == {"after-aggregation", "paper"}
    last = metrics[(metrics["round"] == run.rounds) & (metrics["protocol"] == protocol)]
    expected = last.groupby("method")["accuracy"].mean()
    for row in result.comparison.itertuples():
        assert row.protocol == protocol
        assert row.acc_mean == pytest.approx(expected[row.method])
