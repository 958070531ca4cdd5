"""The presets carry the whole protocol: the optimizers actually built, the saved protocol, the CLI."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from test_data import write_cifar100, write_officehome, write_organamnist
from typer.testing import CliRunner

from fedsens.cli import app
from fedsens.personalize import presets
from fedsens.personalize.federation import run
from fedsens.personalize.methods import METHODS, perfedavg

PAPER = ("paper-cifar100", "paper-organamnist", "paper-officehome")
# Shrink a paper preset to a few seconds on a CPU without touching its optimizer settings.
TINY = dict(
    dataset="synthetic", model="vit-nano", clients=2, rounds=1, local_steps=1, min_samples=8, scheme="dirichlet"
)


class Spy:
    """Records every optimizer constructed and every Per-FedAvg plain-SGD step while it is installed."""

    def __init__(self, monkeypatch):
        self.built: list[tuple[str, float, float]] = []
        spy = self

        class SGD(torch.optim.SGD):
            def __init__(self, params, lr, momentum=0.0, **kw):
                spy.built.append(("SGD", lr, momentum))
                super().__init__(params, lr=lr, momentum=momentum, **kw)

        class AdamW(torch.optim.AdamW):
            def __init__(self, params, lr, **kw):
                spy.built.append(("AdamW", lr, float("nan")))
                super().__init__(params, lr=lr, **kw)

        original_step = perfedavg._sgd_step

        def sgd_step(ctx, params, x, y, lr):
            spy.built.append(("plain SGD step", lr, 0.0))  # p <- p - lr * g: no momentum by construction
            return original_step(ctx, params, x, y, lr)

        monkeypatch.setattr(torch.optim, "SGD", SGD)
        monkeypatch.setattr(torch.optim, "AdamW", AdamW)
        monkeypatch.setattr(perfedavg, "_sgd_step", sgd_step)


@pytest.mark.parametrize("name", PAPER)
def test_every_method_under_a_paper_preset_trains_with_sgd_lr_001_no_momentum(name, tmp_path, monkeypatch):
    chosen = presets.get(name)
    seen = {}
    for method in METHODS:
        spy = Spy(monkeypatch)
        changes = {**TINY, **chosen.method_settings(method)}
        options = dict(changes.get("method_options", {}))
        if options.get("local"):  # vit-nano has 2 blocks: keep its last local, as blocks.11 of ViT-S
            options["local"] = "blocks.1"
        if "mid_dim" in options:  # a narrow adapter: the optimizer is what is checked here
            options["mid_dim"] = 8
        changes["method_options"] = options
        run(chosen.run_config(**changes, out=str(tmp_path / method)), quiet=True)
        seen[method] = sorted(set(spy.built))
        monkeypatch.undo()
    print(f"\n{name}: optimizers constructed per method (kind, lr, momentum)")
    for method, built in seen.items():
        print(f"  {method:18s} {built}")
    for method, built in seen.items():
        lr = 0.001 if method == "perfedavg" else 0.01  # Per-FedAvg: the public code's own lr
        kind = "plain SGD step" if method == "perfedavg" else "SGD"
        assert built == [(kind, lr, 0.0)], (method, built)


def _write_datasets(root):
    labels = [i % 10 for i in range(120)]
    write_cifar100(root, train_labels=labels[:90], test_labels=labels[90:])
    write_organamnist(root / "organamnist.npz", {"train": 60, "val": 20, "test": 20})
    colours = [(250 - 9 * i, 7 * i, 120) for i in range(6)]
    domains = ("Art", "Clipart", "Product", "Real World")
    write_officehome(root, {d: {"Bike": colours, "Candles": colours[::-1]} for d in domains})


@pytest.mark.parametrize("name", PAPER)
def test_each_paper_preset_runs_through_the_cli_and_saves_its_protocol(name, tmp_path, monkeypatch):
    _write_datasets(tmp_path)
    out = tmp_path / "run"
    # --no-verify: the test writes CIFAR-100 pickles itself, so their md5 sums are not the official ones.
    args = ["train", "--preset", name, "--data-root", str(tmp_path), "--out", str(out), "--quiet", "--no-verify"]
    args += ["--model", "vit-nano", "--clients", "4", "--rounds", "1", "--local-epochs", "1", "--min-samples", "8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"protocol ({name})" in result.output and "evaluation protocol" in result.output
    saved = json.loads((out / "protocol.json").read_text())
    assert saved["preset"] == name
    assert (saved["optimizer"], saved["lr"], saved["momentum"], saved["weight_decay"]) == ("sgd", 0.01, 0.0, 0.0)
    assert (saved["batch_size"], saved["join_ratio"], saved["augmentation"]) == (64, 0.125, "off")
    assert (saved["partition_rule"], saved["evaluation_protocol"]) == ("capped", "paper")
    assert (saved["model"], saved["clients"], saved["rounds"], saved["min_samples"]) == ("vit-nano", 4, 1, 8)
    assert saved["alpha"] == (1.0 if name == "paper-officehome" else 0.5)
    assert saved["partition"] == ("domain" if name == "paper-officehome" else "dirichlet")
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics["protocol"]) == {"paper", "after-aggregation"}
    assert json.loads((out / "summary.json").read_text())["protocol"] == "paper"
    assert json.loads((out / "partition.json").read_text())["params"]["rule"] == "capped"


def test_paper_compare_names_the_paper_rows_and_shows_final_and_best(tmp_path, monkeypatch):
    _write_datasets(tmp_path)
    out = tmp_path / "compare"
    args = ["compare", "--preset", "paper-cifar100", "--data-root", str(tmp_path), "--out", str(out), "--quiet"]
    args += ["--no-verify"]
    args += ["--methods", "fedper,fedrep", "--model", "vit-nano", "--clients", "4", "--rounds", "1"]
    args += ["--local-epochs", "1", "--min-samples", "8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "FedRep (public code)" in result.output and "chosen on the test data" in result.output
    summary = pd.read_csv(out / "summary.csv").set_index("method")
    assert summary.loc["fedper", "paper_row"] == "FedRep (public code)"
    assert summary.loc["fedrep", "paper_row"].startswith("-")
    assert set(summary["protocol"]) == {"paper"} and summary["accuracy_best"].notna().all()
    saved = json.loads((out / "protocol.json").read_text())
    assert saved["method_overrides"]["perfedavg"] == {"lr": 0.001} and saved["paper_rows"]["fedper"]
    assert saved["method_overrides"]["fedperfix"] == {"method_options": {"local": "blocks.11"}}


def test_options_override_the_preset_and_help_shows_the_defaults():
    runner = CliRunner()
    for command, shown in (("train", "0.003"), ("sweep", "30"), ("compare", "20")):
        text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        for flag in ("--optimizer", "--lr", "--momentum", "--weight-decay", "--batch-size", "--local-epochs"):
            assert flag in text, (command, flag)
        for flag in ("--no-augment", "--join-ratio", "--rounds", "--model", "--eval-protocol", "--partition-rule"):
            assert flag in text, (command, flag)
        assert "--min-samples" in text and f"default: {shown}" in text, command


def test_train_knobs_reach_the_run_config(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--dataset", "synthetic", "--model", "vit-nano", "--clients", "2", "--rounds", "1", "--quiet"]
    args += ["--optimizer", "sgd", "--lr", "0.02", "--momentum", "0.5", "--weight-decay", "0.001", "--no-augment"]
    args += ["--local-steps", "1", "--eval-protocol", "paper", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["optimizer"], config["lr"], config["momentum"], config["weight_decay"]) == ("sgd", 0.02, 0.5, 0.001)
    assert (config["augment_shift"], config["augment_scale"], config["eval_protocol"]) == (0.0, 0.0, "paper")


# ---- input checked before any cell or run trains -------------------------------------------------

SMALL = ["--model", "vit-nano", "--clients", "4", "--rounds", "1", "--local-steps", "1", "--quiet"]


def _nothing_trained(out) -> bool:
    return not any(out.rglob("checkpoint.pt"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["sweep", "--div-every", "0"], "--div-every must be at least 1"),
        (["sweep", "--dataset", "synthetic", "--parts", "attn@40-41", "--seeds", "0"], "attn@40-41"),
        (["sweep", "--dataset", "synthetic,cifar10", "--seeds", "0"], "cifar10"),
        (["sweep", "--dataset", "synthetic", "--seeds", "0", "--min-samples", "100000"], "min_samples"),
        (["compare", "--dataset", "cifar100", "--methods", "fedavg"], "cifar100"),
        (["compare", "--dataset", "synthetic", "--methods", "fedavg", "--partition-rule", "greedy"], "partition-rule"),
    ],
)
def test_bad_input_stops_the_grid_in_one_line_before_any_cell(args, message, tmp_path):
    out = tmp_path / "grid"
    result = CliRunner().invoke(app, [*args, *SMALL, "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.output
    assert _nothing_trained(out)


def test_a_sweep_of_another_method_is_refused():
    from fedsens.sensitivity.sweep import SweepConfig

    with pytest.raises(Exception, match="the sweep.s cells vary the parts kept local"):
        SweepConfig(run=presets.get("quick").run_config(method="fedper"))


def test_a_grid_in_which_every_cell_failed_exits_non_zero(tmp_path):
    # SGD at lr 1e12 diverges every cell (a NaN loss by the third step): the runs fail, not the input.
    diverge = [*SMALL, "--optimizer", "sgd", "--lr", "1e12", "--local-steps", "3"]
    args = ["compare", "--dataset", "synthetic", "--methods", "fedavg,local", *diverge]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "compare")])
    assert result.exit_code == 1 and "2 failed" in result.output
    args = ["sweep", "--dataset", "synthetic", "--seeds", "0", "--only-parts", "--parts", "head", *diverge]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "sweep")])
    assert result.exit_code == 1 and "2 failed" in result.output


def test_train_applies_the_presets_per_method_lr(tmp_path):
    args = ["train", "--preset", "paper-organamnist", "--method", "perfedavg", "--dataset", "synthetic"]
    args += ["--model", "vit-nano", "--clients", "2", "--rounds", "1", "--local-steps", "1", "--min-samples", "8"]
    result = CliRunner().invoke(app, [*args, "--quiet", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["lr"] == 0.001
    result = CliRunner().invoke(app, [*args, "--lr", "0", "--out", str(tmp_path / "other")])
    assert result.exit_code == 2 and "--lr must be > 0" in result.output  # an explicit option still wins


def test_the_sweeps_protocol_names_the_dataset_and_partition_its_cells_use():
    from fedsens.sensitivity import sweep as sweep_lib

    config = sweep_lib.preset("quick")
    single = sweep_lib.protocol(
        sweep_lib.SweepConfig(run=config.run, datasets=("officehome",), schemes=("domain",), alphas=(1.0,))
    )
    assert (single["dataset"], single["partition"], single["alpha"]) == ("officehome", "domain", 1.0)
    several = sweep_lib.protocol(sweep_lib.SweepConfig(run=config.run, alphas=(0.1, 0.5)))
    assert several["alpha"] == [0.1, 0.5] and several["dataset"] == config.run.dataset
