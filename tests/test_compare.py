"""`fedsens compare`: the comparison tables, resuming, failures, presets and the command line."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedsens.cli import app
from fedsens.personalize import federation, runio
from fedsens.personalize.errors import UserError
from fedsens.personalize.federation import RunConfig
from fedsens.sensitivity import compare as compare_lib
from fedsens.sensitivity.compare import CompareConfig, preset, run_compare, run_config

CONTRACT = ["method", "seed", "acc_mean", "acc_std", "acc_p10", "local_params", "comm_bytes_per_round", "seconds"]


def tiny(tmp_path, methods=("fedavg", "local"), seeds=(0,), **run) -> CompareConfig:
    options = dict(
        dataset="synthetic",
        model="vit-nano",
        clients=3,
        join_ratio=1.0,
        rounds=1,
        local_steps=2,
        batch_size=16,
        device="cpu",
    )
    return CompareConfig(
        run=RunConfig(**{**options, **run}),
        methods=methods,
        seeds=seeds,
        method_options={"mid_dim": 8},
        out=str(tmp_path / "compare"),
        quiet=True,
        force=True,  # one round teaches the reference nothing: past the reference check (test_sanity.py)
    )


def test_compare_writes_the_tables_and_a_second_call_reruns_nothing(tmp_path, monkeypatch):
    config = tiny(tmp_path, seeds=(0, 1))
    first = run_compare(config)
    out = tmp_path / "compare"
    comparison = pd.read_csv(out / "comparison.csv")
    assert list(comparison.columns[:8]) == CONTRACT
    runs = list(zip(comparison["method"], comparison["seed"]))
    assert runs == [("fedavg", 0), ("local", 0), ("fedavg", 1), ("local", 1)]
    assert (comparison["status"] == "done").all() and comparison["acc_mean"].between(0, 1).all()
    local = comparison[comparison["method"] == "local"]
    assert (local["comm_bytes_per_round"] == 0).all() and (local["local_params"] > 0).all()
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["method"]) == ["fedavg", "local"] and (summary["seeds"] == 2).all()
    assert summary["accuracy"].str.fullmatch(r"\d+\.\d\d ± \d+\.\d\d").all()
    for table in ("rounds", "metrics"):
        frame = pd.read_csv(out / f"{table}.csv")
        assert list(frame.columns[:2]) == ["method", "seed"] and set(frame["seed"]) == {0, 1}
    assert (out / "compare.json").exists() and (out / "runs" / "local-s1" / "summary.json").exists()
    hashes = {
        (m, s): runio.read_json(out / "runs" / f"{m}-s{s}" / "partition.json")["hash"]
        for m in ("fedavg", "local")
        for s in (0, 1)
    }
    assert hashes[("fedavg", 0)] == hashes[("local", 0)] != hashes[("fedavg", 1)] == hashes[("local", 1)]

    monkeypatch.setattr(federation, "run", lambda *a, **k: pytest.fail("a finished run was trained again"))
    second = run_compare(config)
    assert second.ran == () and len(second.skipped) == 4
    pd.testing.assert_frame_equal(second.comparison, first.comparison)


def test_a_half_done_run_continues_from_its_checkpoint(tmp_path, monkeypatch):
    run_compare(tiny(tmp_path, methods=("fedper",)))
    rounds_path = tmp_path / "compare" / "runs" / "fedper-s0" / "rounds.csv"
    round_one = pd.read_csv(rounds_path).iloc[0]
    calls = []
    real_run = federation.run
    monkeypatch.setattr(federation, "run", lambda config, **k: calls.append(k) or real_run(config, **k))
    result = run_compare(tiny(tmp_path, methods=("fedper",), rounds=2))
    # one call, resuming; its only hook reports rounds to the progress bar
    assert [{**c, "hooks": [type(h).__name__ for h in c["hooks"]]} for c in calls] == [
        {"hooks": ["_RoundReporter"], "resume": True, "quiet": True}
    ]
    rounds = pd.read_csv(rounds_path)
    assert list(rounds["round"]) == [1, 2]
    pd.testing.assert_series_equal(rounds.iloc[0], round_one)  # round 1 was not trained again
    assert result.comparison.loc[0, "rounds"] == 2


def test_a_failing_method_is_recorded_and_the_others_go_on(tmp_path, monkeypatch):
    real_run = federation.run

    def flaky(config, **kwargs):
        if config.method == "local":
            raise RuntimeError("diverged")
        return real_run(config, **kwargs)

    monkeypatch.setattr(federation, "run", flaky)
    result = run_compare(tiny(tmp_path))
    # the reference check trained fedavg-s0 before the loop: counted as trained, not reused
    assert result.failed == ("local-s0",) and result.skipped == () and "fedavg-s0" in result.ran
    assert "diverged" in (tmp_path / "compare" / "runs" / "local-s0" / "error.txt").read_text()
    assert list(result.comparison["status"]) == ["done", "failed"]
    summary = result.summary.set_index("method")
    assert summary.loc["local", "failed"] == 1 and summary.loc["local", "accuracy"] == "-"
    assert summary.loc["fedavg", "accuracy"] == f"{100 * result.comparison.loc[0, 'acc_mean']:.2f}"  # one seed: no ±


def test_other_settings_in_the_same_folder_are_refused_unless_fresh(tmp_path):
    run_compare(tiny(tmp_path, methods=("fedavg",)))
    with pytest.raises(UserError, match="other settings \\(lr\\)"):
        run_compare(tiny(tmp_path, methods=("fedavg",), lr=0.01))
    result = run_compare(dataclasses.replace(tiny(tmp_path, methods=("fedavg",), lr=0.01), fresh=True))
    assert result.ran == ("fedavg-s0",)


def test_apfl_counts_its_personal_model_as_local(tmp_path):
    result = run_compare(tiny(tmp_path, methods=("fedavg", "apfl")))
    params = result.comparison.set_index("method")["local_params"]
    parts = pd.read_csv(tmp_path / "compare" / "runs" / "fedavg-s0" / "parts.csv")
    assert params["fedavg"] == 0 and params["apfl"] == parts["numel"].sum()


def test_presets_carry_the_papers_settings():
    cifar = preset("paper-cifar100")
    fedperfix, perfedavg = run_config(cifar, "fedperfix", 1), run_config(cifar, "perfedavg", 1)
    settings = (fedperfix.model, fedperfix.clients, fedperfix.join_ratio, fedperfix.lr, fedperfix.local_epochs)
    assert settings == ("vit_small_patch16_224", 64, 0.125, 0.01, 10)
    assert fedperfix.method_options == {"local": "blocks.11", "blocks": "all", "scale": 1.5, "mid_dim": 256}
    # the public code's vanilla prefix is a switch on its FedPerfix preset: blocks.11 stays local too (issue 10)
    assert run_config(cifar, "vanilla-prefix", 1).method_options["local"] == "blocks.11"
    assert run_config(cifar, "fedbabu", 1).method_options == {"finetune_steps": 1}
    assert (perfedavg.lr, perfedavg.method_options) == (0.001, {"beta": None})  # None: beta = lr, as the public code
    assert run_config(preset("paper-organamnist"), "fedperfix", 1).method_options["local"] == ""
    office = run_config(preset("paper-officehome"), "fedavg", 1)
    assert (office.scheme, office.clients, office.alpha) == ("domain", 16, 1.0)
    assert tuple(preset("default").methods) == compare_lib.PAPER_METHODS
    with pytest.raises(UserError, match="unknown preset"):
        preset("paper-imagenet")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"methods": ("fedavg", "fedprox")}, "unknown method 'fedprox'"),
        ({"methods": ()}, "--methods is empty"),
        ({"methods": ("fedavg", "fedavg")}, "names a method twice"),
        ({"seeds": ()}, "--seeds"),
    ],
)
def test_bad_method_and_seed_lists_are_user_errors(tmp_path, changes, message):
    with pytest.raises(UserError, match=message):
        dataclasses.replace(tiny(tmp_path), **changes)


def test_the_command_prints_the_summary_table(tmp_path):
    out = tmp_path / "cli"
    args = [
        "compare",
        "--dataset",
        "synthetic",
        "--model",
        "vit-nano",
        "--rounds",
        "1",
        "--clients",
        "3",
        "--methods",
        "fedavg,fedperfix",
        "--seeds",
        "0",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--quiet",
        "--force",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "fedperfix" in result.output and "accuracy % (final)" in result.output
    config = runio.read_json(out / "compare.json")
    assert config["methods"] == ["fedavg", "fedperfix"] and config["run"]["rounds"] == 1
    assert config["method_options"] == {"mid_dim": 64}  # the default preset's value survives the options given
    saved = runio.read_json(out / "runs" / "fedperfix-s0" / "config.json")["config"]
    assert saved["method_options"]["mid_dim"] == 64


def test_the_command_reports_bad_input_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["compare", "--methods", "fedavg,nope", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "error: unknown method 'nope'" in result.output
