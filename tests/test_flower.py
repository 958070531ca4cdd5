"""fedsens methods on Flower's simulation engine give the built-in engine's per-client accuracies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("flwr")

from fedsens.personalize import federation  # noqa: E402
from fedsens.personalize.config import RunConfig  # noqa: E402
from fedsens.personalize.engine.context import build_context  # noqa: E402
from fedsens.personalize.flower import records  # noqa: E402
from fedsens.personalize.flower.engine import run_simulation  # noqa: E402
from fedsens.personalize.methods import get_method  # noqa: E402

TINY = dict(
    dataset="synthetic", model="vit-nano", clients=4, rounds=3, local_steps=1, join_ratio=0.5, device="cpu", seed=3
)


@pytest.mark.parametrize("method", ["fedavg", "fedper", "fedperfix"])
def test_flower_simulation_matches_builtin_engine(tmp_path, method):
    config = RunConfig(method=method, out=str(tmp_path / "builtin"), **TINY)
    builtin = federation.run(config, quiet=True)
    flower = run_simulation(config.replace(out=str(tmp_path / "flower")), quiet=True)

    keys = ["round", "client", "protocol"]  # Flower evaluates after aggregation; the built-in loop records both
    pair = builtin.metrics.merge(flower.metrics, on=keys, suffixes=("_builtin", "_flower"))
    assert len(pair) == 4 * 3 and len(flower.metrics) == 4 * 3
    assert np.abs(pair["accuracy_builtin"] - pair["accuracy_flower"]).max() <= 1e-5
    assert np.abs(pair["loss_builtin"] - pair["loss_flower"]).max() <= 1e-5
    assert (pair["participated_builtin"] == pair["participated_flower"]).all()
    # the same run folder, so `fedsens report` reads it unchanged
    for name in ("config.json", "partition.json", "parts.csv", "metrics.csv", "rounds.csv", "summary.json"):
        assert (tmp_path / "flower" / name).is_file()
    assert list(flower.rounds.columns) == list(builtin.rounds.columns)
    # bytes counted from Flower's ArrayRecords: each participant's shared tensors, each serialised as
    # .npy (a header of at most 128 bytes) and keyed by its name; the local tensors never travel
    shared = build_context(config, get_method(config), tmp_path / "names").shared_names
    traffic = flower.tables["flower"]
    participants = flower.metrics.groupby("round")["participated"].sum().to_numpy()
    overhead = (traffic["train_up_bytes"].to_numpy() - builtin.rounds["up_bytes"].to_numpy()) / participants
    names = sum(len(n) for n in shared)
    assert ((overhead > names) & (overhead <= names + 128 * len(shared))).all()
    assert (traffic["train_down_bytes"] == traffic["train_up_bytes"]).all()
    assert (traffic["eval_down_bytes"] == traffic["train_down_bytes"] / participants * 4).all()


def test_run_config_round_trip_keeps_the_run():
    config = RunConfig(method="fedperfix", method_options={"scale": 1.0}, alpha=1.0, lr=0.01, out="x", **TINY)
    flat = records.run_config_of(config)
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    assert records.config_of({**flat, "alpha": 1}) == config  # TOML's 1 for 1.0 comes back a float


def test_unknown_run_config_key_is_a_user_error():
    from fedsens.personalize.errors import UserError

    with pytest.raises(UserError, match="unknown keys"):
        records.config_of({"rounds": 2, "round": 3})


def test_train_engine_flower_and_flower_app_from_the_cli(tmp_path):
    import subprocess
    import sys

    import tomllib
    from typer.testing import CliRunner

    from fedsens.cli import app

    options = ["--dataset", "synthetic", "--model", "vit-nano", "--clients", "2", "--rounds", "1"]
    options += ["--local-steps", "1", "--method", "fedper", "--device", "cpu", "--quiet"]
    trained = CliRunner().invoke(app, ["train", *options, "--out", str(tmp_path / "run"), "--engine", "flower"])
    assert trained.exit_code == 0, trained.output
    assert "method=fedper" in trained.output and (tmp_path / "run" / "flower.csv").is_file()
    again = CliRunner().invoke(app, ["train", *options, "--out", str(tmp_path / "run"), "--engine", "flower"])
    assert again.exit_code == 2 and "--overwrite" in again.output

    written = CliRunner().invoke(
        app, ["flower", "app", str(tmp_path / "app"), *options[:-1], "--lr", "0.01", "--out", "relative"]
    )
    assert written.exit_code == 0, written.output
    project = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedsens_app:server_app",
        "clientapp": "fedsens_app:client_app",
    }
    config = records.config_of(project["tool"]["flwr"]["app"]["config"])
    assert (config.method, config.clients, config.lr, config.local_steps) == ("fedper", 2, 0.01, 1)
    assert Path(config.out).is_absolute()  # the ServerApp runs elsewhere
    # fedsens itself never imports Flower: only its Flower engine and apps do
    probe = "import sys, fedsens.cli, fedsens.personalize.flower; assert 'flwr' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", probe], timeout=120).returncode == 0


def test_a_diverging_run_on_flower_ends_diverged_exit_3_as_on_the_builtin_engine(tmp_path):
    from typer.testing import CliRunner

    from fedsens.cli import app
    from fedsens.personalize import runio

    tiny = ["--dataset", "synthetic", "--model", "vit-nano", "--clients", "4", "--local-steps", "1", "--quiet"]
    diverging = [*tiny, "--rounds", "3", "--lr", "1e6", "--optimizer", "sgd", "--device", "cpu"]
    summaries = {}
    for engine in ("builtin", "flower"):
        out = tmp_path / engine
        result = CliRunner().invoke(app, ["train", *diverging, "--engine", engine, "--out", str(out)])
        assert result.exit_code == 3, result.output
        assert "diverged" in result.output and "lower --lr" in result.output and "Traceback" not in result.output
        summaries[engine] = runio.read_json(out / "summary.json")
        rounds = runio.read_json(out / "summary.json")["rounds"]
        assert len(pd.read_csv(out / "rounds.csv")) == rounds  # the tables hold the rounds before it
    builtin, flower = summaries["builtin"], summaries["flower"]
    assert builtin["status"] == flower["status"] == "diverged"
    assert {k: flower["diverged"][k] for k in ("round", "client")} == {
        k: builtin["diverged"][k] for k in ("round", "client")
    }
