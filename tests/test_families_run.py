"""Every family trains: a two-part, one-seed, two-round sweep on a tiny Swin and a tiny EVA (tables, stage column,
ranking, report), and FedPerfix on a tiny variant of every family, from scratch and from a weights file."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from fedsens.personalize import families
from fedsens.personalize import model as model_lib
from fedsens.personalize.config import RunConfig
from fedsens.personalize.federation import run
from fedsens.sensitivity.sweep import SweepConfig, run_sweep

FAMILIES = {family.name: family for family in families.all_families()}


def _tiny_run(family: str, out, **changes) -> RunConfig:
    spec = FAMILIES[family]
    settings = dict(clients=4, join_ratio=0.5, rounds=2, local_epochs=1, device="cpu")
    return RunConfig(
        dataset="synthetic", model=spec.examples[0], model_args=spec.tiny, out=str(out), **{**settings, **changes}
    )


@pytest.mark.parametrize("family", ["swin", "eva"])
def test_a_two_part_sweep_runs_on_a_tiny_swin_and_eva(tmp_path, family):
    config = SweepConfig(
        run=_tiny_run(family, tmp_path),
        parts=("attn", "head"),
        seeds=(0,),
        out=str(tmp_path / "sweep"),
        quiet=True,
        force=True,
    )
    run_sweep(config)
    sensitivity = pd.read_csv(tmp_path / "sweep" / "sensitivity.csv")
    assert sorted(sensitivity["local_part"]) == ["attn", "head", "none"]
    assert set(pd.read_csv(tmp_path / "sweep" / "ranking.csv")["part"]) == {"attn", "head"}
    cell = next((tmp_path / "sweep" / "cells").glob("*attn*"))
    parts = pd.read_csv(cell / "parts.csv")
    assert ("stage" in parts.columns) == (family == "swin")
    local = parts[parts["local"]]
    assert len(local) and (local["part"] == "attn").all()
    from fedsens.reports.report import build_report

    assert build_report(tmp_path / "sweep", quiet=True).is_file()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fedperfix_trains_on_every_family(tmp_path, family):
    config = _tiny_run(family, tmp_path / "run", rounds=1, method="fedperfix", method_options={"mid_dim": 8})
    result = run(config, quiet=True)
    parts = pd.read_csv(tmp_path / "run" / "parts.csv")
    plugged = parts[parts["part"] == "plugin"]
    attentions = len(families.of(_built(config)).attentions(_built(config)))
    assert len(plugged) == 4 * attentions and plugged["local"].all()  # down/up weight and bias per attention
    assert result.summary["rounds"] == 1


def _built(config: RunConfig):
    spec = model_lib.input_spec(config.model, data_channels=1, data_size=16, model_args=config.model_args)
    return model_lib.build(config.model, 10, spec.in_chans, spec.img_size, model_args=config.model_args)


def test_a_run_starts_from_a_weights_file_of_another_class_count(tmp_path):
    source_config = _tiny_run("eva", tmp_path)
    spec = model_lib.input_spec(source_config.model, data_channels=1, data_size=16, model_args=source_config.model_args)
    source = model_lib.build(source_config.model, 5, 3, spec.img_size, model_args=source_config.model_args, seed=3)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "eva.safetensors"))
    config = _tiny_run("eva", tmp_path / "run", rounds=1, weights=str(tmp_path / "eva.safetensors"))
    assert run(config, quiet=True).summary["rounds"] == 1
    loaded = model_lib.build(config.model, 10, 3, spec.img_size, model_args=config.model_args, weights=config.weights)
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_the_flower_engine_runs_a_tiny_swin_with_fedperfix(tmp_path):
    pytest.importorskip("flwr")
    from fedsens.personalize.flower import records
    from fedsens.personalize.flower.engine import run_simulation

    config = _tiny_run("swin", tmp_path / "flower", rounds=1, method="fedperfix", method_options={"mid_dim": 4})
    assert records.config_of(records.run_config_of(config)) == config  # model args survive Flower's scalar config
    result = run_simulation(config, quiet=True)
    assert len(result.metrics) and "stage" in pd.read_csv(tmp_path / "flower" / "parts.csv").columns


def _model_arg_flags(args: dict) -> list[str]:
    """A tiny variant's constructor options as `fedsens train` takes them (lists comma-separated)."""
    flags = []
    for key, value in args.items():
        text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        flags += ["--model-arg", f"{key}={text}"]
    return flags


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fedsens_train_runs_every_family_from_a_weights_file_of_another_class_count(tmp_path, family):
    from typer.testing import CliRunner

    from fedsens.cli import app

    spec = FAMILIES[family]
    name, args = spec.examples[0], dict(spec.tiny)
    size = model_lib.input_spec(name, data_channels=1, data_size=16, model_args=args).img_size
    source = model_lib.build(name, 7, 3, size, model_args=args, seed=3)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "source.safetensors"))
    command = ["train", "--model", name, *_model_arg_flags(args), "--weights", str(tmp_path / "source.safetensors")]
    command += ["--dataset", "synthetic", "--clients", "4", "--rounds", "1", "--local-steps", "1"]
    result = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(tmp_path / "run" / "rounds.csv")) == 1 and "weights sha256" in result.output
    loaded = model_lib.build(name, 10, 3, size, model_args=args, weights=str(tmp_path / "source.safetensors"))
    table = model_lib.parts(loaded)
    heads = set(table.loc[table["part"] == "head", "param"])
    assert heads
    for key, tensor in loaded.state_dict().items():  # every tensor from the file but the classifier(s), re-seeded
        if key in heads:
            assert tensor.shape[0] == 10 and source.state_dict()[key].shape[0] == 7, key
        else:
            assert torch.equal(tensor, source.state_dict()[key]), key
