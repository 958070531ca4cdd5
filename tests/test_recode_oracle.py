"""benchmarks/recode_oracle.py: the inverse-start hook undoes the planted re-coding exactly for each client,
and the script runs (one round, one seed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fedsens.personalize.datasets import planted, registry
from fedsens.personalize.engine.context import build_context
from fedsens.personalize.methods import get_method
from fedsens.sensitivity.sweep import Cell, cell_config

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("recode_oracle", ROOT / "benchmarks" / "recode_oracle.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["recode_oracle"] = module
    spec.loader.exec_module(module)
    return module


def test_each_clients_inverse_start_maps_its_recoded_patches_to_the_shared_tokens_of_the_plain_ones(tmp_path):
    oracle = _script()
    sweep = oracle.recode_sweep(tmp_path, (0,), rounds=1)
    config = cell_config(sweep, Cell("planted", "domain", sweep.run.alpha, 0, "embed"))
    ctx = build_context(config, get_method(config), tmp_path / "cell")
    hook = oracle.InverseEmbeddingStart(planted.Options(**config.data_options))
    hook.on_run_start(ctx)
    assert sorted(hook.order) == list(range(config.clients))  # strength 1: every client's domain is re-coded
    base = registry.load("digits", None)
    proj = ctx.model.patch_embed.proj
    shared = proj.weight.detach().clone()
    for client in (0, 7, 19):
        hook.on_client_start(1, client, ctx.model)
        index = torch.from_numpy(ctx.partition.train[client])
        recoded, plain = ctx.images[index].double(), base.images[index].double()
        assert not torch.equal(recoded, plain)
        tokens = F.conv2d(recoded, proj.weight.double(), stride=proj.stride)
        assert torch.allclose(tokens, F.conv2d(plain, shared.double(), stride=proj.stride))
        hook.on_client_start(2, client, ctx.model)  # a later participation leaves the trained embedding alone
        assert torch.allclose(F.conv2d(recoded, proj.weight.double(), stride=proj.stride), tokens)
        proj.weight.data.copy_(shared)


def test_the_script_prints_fedavg_embed_and_the_inverse_start(tmp_path, capsys):
    table = _script().main(["--seeds", "0", "--rounds", "1", "--out", str(tmp_path)])
    assert list(table["cell"]) == ["FedAvg", "embed local", "embed local, inverse start"]
    assert table.loc[0, "gain_vs_fedavg"] == 0
    assert "inverse start" in capsys.readouterr().out
