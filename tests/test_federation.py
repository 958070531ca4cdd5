"""The round loop: exact aggregation, locality, determinism, resume, all-client evaluation."""

import numpy as np
import pandas as pd
import pytest
import torch

from fedsens.personalize import runio, schema
from fedsens.personalize.errors import UserError
from fedsens.personalize.federation import RunConfig, accuracy_stats, run, sample_clients
from fedsens.personalize.hooks import Hook
from fedsens.personalize.methods import weighted_mean

TINY = dict(
    dataset="synthetic", model="vit-nano", clients=4, join_ratio=0.5, rounds=2, local_epochs=1, batch_size=32, alpha=1.0
)


class Recorder(Hook):
    """A hook that keeps every participant's tensors right after local training."""

    table = "recorder"

    def __init__(self):
        self.ends = {}

    def on_run_start(self, ctx):
        self.ctx = ctx

    def on_client_end(self, round_, client, model):
        self.ends[(round_, client)] = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_round_end(self, round_):
        return [{"round": round_, "clients": len([k for k in self.ends if k[0] == round_])}]


def test_weighted_mean_is_exact():
    a = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "steps": torch.tensor(7)}
    out = weighted_mean([a, b], [1, 3])
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0]))
    assert out["steps"].item() == 3


def test_shared_is_the_weighted_mean_and_local_never_leaves_a_client(tmp_path):
    recorder = Recorder()
    config = RunConfig(out=str(tmp_path), personalize="head", **{**TINY, "rounds": 1})
    run(config, hooks=[recorder], quiet=True)
    state = runio.load_checkpoint(tmp_path / "checkpoint.pt")
    partition = recorder.ctx.partition
    participants = sample_clients(config, 1)
    assert set(k[1] for k in recorder.ends) == set(participants)
    assert "head.weight" not in state["shared"] and "blocks.0.attn.qkv.weight" in state["shared"]
    weights = [len(partition.train[c]) for c in participants]
    for name, value in state["shared"].items():
        expected = sum(recorder.ends[(1, c)][name].double() * w for c, w in zip(participants, weights)) / sum(weights)
        assert torch.allclose(value.double(), expected, atol=1e-6), name
    local_heads = state["local"]["tensors"]["head.weight"]  # clients x shape, one tensor for all clients
    assert local_heads.shape[0] == 4
    init_head = [local_heads[c] for c in range(4) if c not in participants]
    for c in range(4):
        if c in participants:
            assert torch.equal(local_heads[c], recorder.ends[(1, c)]["head.weight"])
        else:  # non-participants keep their (initial) local parameters
            assert torch.equal(local_heads[c], init_head[0])
    heads = [local_heads[c] for c in participants]
    assert not torch.equal(heads[0], heads[1])  # each participant kept its own head, nothing averaged
    rows = pd.read_csv(tmp_path / "recorder.csv")
    assert rows["clients"].tolist() == [len(participants)]


def test_every_client_is_evaluated_and_tables_have_the_design_columns(tmp_path):
    result = run(RunConfig(out=str(tmp_path), **TINY), quiet=True)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert list(metrics.columns) == ["round", "client", "split", "loss", "accuracy", "n", "participated", "protocol"]
    for protocol in runio.EVAL_PROTOCOLS:  # both protocols, every client, every round
        rows = metrics[metrics["protocol"] == protocol]
        assert sorted(rows.loc[rows["round"] == 2, "client"]) == [0, 1, 2, 3]
        assert rows["participated"].sum() == 2 * 2  # two of four clients each round
    rounds = pd.read_csv(tmp_path / "rounds.csv")
    assert list(rounds.columns) == schema.ROUNDS_COLUMNS
    for name in ("config.json", "partition.json", "parts.csv", "summary.json"):
        assert (tmp_path / name).exists()
    assert result.summary["status"] == "done" and result.summary["rounds"] == 2
    config = runio.read_json(tmp_path / "config.json")
    assert config["config"]["seed"] == 0 and "torch" in config["versions"]
    parts = pd.read_csv(tmp_path / "parts.csv")
    assert list(parts.columns) == ["param", "part", "block", "numel", "bytes", "local"]


def test_same_seed_same_metrics_and_other_seed_differs(tmp_path):
    a = run(RunConfig(out=str(tmp_path / "a"), **TINY), quiet=True).metrics
    b = run(RunConfig(out=str(tmp_path / "b"), **TINY), quiet=True).metrics
    c = run(RunConfig(out=str(tmp_path / "c"), seed=1, **TINY), quiet=True).metrics
    pd.testing.assert_frame_equal(a, b)
    assert not a["loss"].equals(c["loss"])


class Killer(Recorder):
    table = "killer"

    def on_round_end(self, round_):
        if round_ == 2:
            raise KeyboardInterrupt("killed")
        return []


def test_a_killed_run_resumes_to_the_same_result(tmp_path):
    config = dict(TINY, rounds=3)
    whole = run(RunConfig(out=str(tmp_path / "whole"), **config), quiet=True)
    cut = RunConfig(out=str(tmp_path / "cut"), **config)
    with pytest.raises(KeyboardInterrupt):
        run(cut, hooks=[Killer()], quiet=True)
    assert runio.load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["round"] == 1
    with pytest.raises(UserError, match="--resume"):
        run(cut, quiet=True)
    resumed = run(cut, resume=True, quiet=True)
    pd.testing.assert_frame_equal(whole.metrics, resumed.metrics)
    cols = ["round", "acc_mean", "acc_std", "up_bytes"]
    pd.testing.assert_frame_equal(whole.rounds[cols], resumed.rounds[cols])


def test_resume_refuses_a_different_configuration(tmp_path):
    run(RunConfig(out=str(tmp_path), **{**TINY, "rounds": 1}), quiet=True)
    with pytest.raises(UserError, match=r"other settings \(lr 0\.\d+ -> 0\.5\)"):
        run(RunConfig(out=str(tmp_path), **{**TINY, "rounds": 1, "lr": 0.5}), resume=True, quiet=True)


def test_local_only_exchanges_nothing_and_fedavg_counts_bytes(tmp_path):
    local = run(RunConfig(out=str(tmp_path / "l"), personalize="all", **{**TINY, "rounds": 1}), quiet=True)
    fedavg = run(RunConfig(out=str(tmp_path / "f"), **{**TINY, "rounds": 1}), quiet=True)
    assert local.rounds["up_bytes"].tolist() == [0] and local.summary["comm_bytes_per_round"] == 0
    params = fedavg.summary["shared_params"]
    assert fedavg.rounds["up_bytes"].tolist() == [2 * params * 4]


def test_a_short_run_on_synthetic_learns(tmp_path):
    config = RunConfig(out=str(tmp_path), **{**TINY, "rounds": 6, "join_ratio": 1.0, "local_epochs": 2})
    result = run(config, quiet=True)
    assert result.summary["acc_best"] > 0.5  # ten classes: chance is 0.1


def test_accuracy_stats():
    stats = accuracy_stats(np.array([0.5, 1.0, np.nan]))
    assert stats["acc_mean"] == 0.75 and stats["acc_min"] == 0.5
    assert stats["jain"] == pytest.approx(1.5**2 / (2 * 1.25))


@pytest.mark.parametrize("bad", [dict(alpha=0), dict(join_ratio=1.5), dict(rounds=0), dict(optimizer="lbfgs")])
def test_bad_arguments_are_user_errors(bad):
    with pytest.raises(UserError):
        RunConfig(**bad)


def test_more_clients_than_samples_is_a_user_error(tmp_path):
    with pytest.raises(UserError):
        run(RunConfig(out=str(tmp_path), **{**TINY, "clients": 5000}), quiet=True)


def test_both_evaluation_protocols_are_recorded_at_their_moments(tmp_path):
    """paper: a participant is tested on its model right after local training; a client that sat the
    round out on the start-of-round model (= the previous round's aggregated one); after-aggregation:
    everyone on the aggregated model. The headline protocol picks rounds.csv's acc_* columns."""
    recorder = Recorder()
    config = RunConfig(out=str(tmp_path), eval_protocol="paper", **{**TINY, "rounds": 3})
    result = run(config, hooks=[recorder], quiet=True)
    metrics = result.metrics.set_index(["protocol", "round", "client"])
    ctx = recorder.ctx
    from fedsens.personalize.client import ClientContext
    from fedsens.personalize.inputs import seeded_generator
    from fedsens.personalize.methods import get_method

    for round_ in (2, 3):
        for c in sample_clients(config, round_):  # participants: their post-training model
            ctx.model.load_state_dict({**ctx.model.state_dict(), **recorder.ends[(round_, c)]})
            client = ClientContext(ctx, c, round_, {}, seeded_generator(config.seed, round_, c, 2))
            expected = get_method(config).evaluate_client(client).accuracy
            assert metrics.loc[("paper", round_, c), "accuracy"] == pytest.approx(expected)
            assert metrics.loc[("paper", round_, c), "participated"]
        for c in set(range(4)) - set(sample_clients(config, round_)):
            assert (
                metrics.loc[("paper", round_, c), "accuracy"]
                == metrics.loc[("after-aggregation", round_ - 1, c), "accuracy"]
            )
    rounds = result.rounds.set_index("round")
    paper_mean = result.metrics[result.metrics["protocol"] == "paper"].groupby("round")["accuracy"].mean()
    aggregated_mean = (
        result.metrics[result.metrics["protocol"] == "after-aggregation"].groupby("round")["accuracy"].mean()
    )
    assert np.allclose(rounds["acc_mean"], paper_mean) and np.allclose(rounds["acc_mean_paper"], paper_mean)
    assert np.allclose(rounds["acc_mean_after_aggregation"], aggregated_mean)
    assert set(rounds["protocol"]) == {"paper"} and result.summary["protocol"] == "paper"
