"""Divergence metrics against hand-computed values, parameter groups, and the recorder hook."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fedsens.personalize import model as M
from fedsens.sensitivity.divergence import (
    DivergenceRecorder,
    block_paths,
    divergence_rows,
    group_names,
    linear_cka,
    mean_pairwise_cka,
    parameter_groups,
    relative_drift,
    token_rows,
    update_cosine,
    weight_divergence,
)


def _gram_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """The HSIC form with centred Gram matrices, as in Kornblith et al. (2019), eq. for linear CKA."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float((k * l).sum() / torch.sqrt((k * k).sum() * (l * l).sum()))


# ---- metrics --------------------------------------------------------------------------------


def test_identical_clients_have_cosine_one_and_no_divergence():
    start = torch.tensor([[1.0, 2.0, 2.0]] * 3)
    end = start + torch.tensor([0.5, -1.0, 0.25])
    assert update_cosine(start, end) == pytest.approx(1.0)
    assert weight_divergence(end) == pytest.approx(0.0)
    assert relative_drift(start, end) == pytest.approx(math.sqrt(0.25 + 1 + 0.0625) / 3)


def test_orthogonal_updates_have_cosine_zero():
    start = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    end = start + torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert update_cosine(start, end) == pytest.approx(0.0, abs=1e-12)
    assert relative_drift(start, end) == pytest.approx(1.0)
    # mean end (1.5, 0.5); each client is (0.5, 0.5) away from it
    assert weight_divergence(end) == pytest.approx(math.sqrt(0.5 / 2.5))


def test_two_clients_by_hand():
    start = torch.tensor([[2.0, 1.0, 2.0], [2.0, 1.0, 2.0]])  # ||start|| = 3
    end = start + torch.tensor([[3.0, 4.0, 0.0], [4.0, 3.0, 0.0]])  # updates of norm 5
    assert update_cosine(start, end) == pytest.approx(24 / 25)
    assert relative_drift(start, end) == pytest.approx(5 / 3)
    # ends (5,5,2) and (6,4,2), mean (5.5,4.5,2): each 0.5*sqrt(2) away, ||mean||^2 = 54.5
    assert weight_divergence(end) == pytest.approx(math.sqrt(0.5 / 54.5))


def test_three_clients_average_over_the_pairs():
    start = torch.zeros(3, 2) + 1.0
    end = start + torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert update_cosine(start, end) == pytest.approx((0 + 1 + 0) / 3)


def test_undefined_ratios_are_nan_not_perfect():
    start = torch.zeros(2, 3)
    assert math.isnan(update_cosine(start, start))  # no update at all
    assert math.isnan(relative_drift(start, start + 1))  # zero start
    assert math.isnan(update_cosine(start[:1], start[:1] + 1))  # one client: no pair


def test_cka_is_squared_correlation_in_one_dimension():
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0], [3.0], [2.0]])
    # centred (-1,0,1) and (-1,1,0): (1)^2 / (2 * 2)
    assert linear_cka(x, y) == pytest.approx(0.25)


def test_cka_matches_the_gram_formulation_and_is_one_for_identical_features():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = torch.randn(40, 9, generator=g, dtype=torch.float64)
    assert linear_cka(x, y) == pytest.approx(_gram_cka(x, y), rel=1e-9)
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert 0.0 < linear_cka(x, y) < 1.0


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(50, 8, generator=g), torch.randn(50, 5, generator=g)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    moved = 3.7 * x @ q + 2.0  # rotate, scale and shift
    assert linear_cka(x, moved) == pytest.approx(1.0)
    assert linear_cka(moved, z) == pytest.approx(linear_cka(x, z))


def test_cka_is_not_invariant_to_anisotropic_scaling():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 4, generator=g)
    assert linear_cka(x, x * torch.tensor([1.0, 1.0, 1.0, 10.0])) < 0.99


def test_mean_pairwise_cka_averages_the_pairs():
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randn(30, 4, generator=g) for _ in range(3))
    expected = (linear_cka(a, b) + linear_cka(a, c) + linear_cka(b, c)) / 3
    assert mean_pairwise_cka([a, b, c]) == pytest.approx(expected)
    assert math.isnan(mean_pairwise_cka([a]))


def test_token_rows_puts_tokens_in_rows():
    assert token_rows(torch.zeros(4, 17, 48)).shape == (68, 48)
    assert token_rows(torch.zeros(4, 10)).shape == (4, 10)


# ---- parameter groups on a tiny ViT ---------------------------------------------------------


class Prefix(nn.Module):
    fedsens_part = "plugin"

    def __init__(self, dim: int):
        super().__init__()
        self.down = nn.Linear(dim, 4)  # never called by timm's attention: no CKA for it

    def forward(self, x):
        return self.down(x)


def _tiny_vit(plugin: bool = False) -> nn.Module:
    model = M.build("vit-nano", 3, 1, 8, patch_size=4, seed=0)  # 4 patches + cls, width 48, depth 2
    if plugin:
        model.blocks[1].attn.prefix = Prefix(48)
    return model


def test_parameter_groups_name_modules_and_parts():
    model = _tiny_vit(plugin=True)
    groups = parameter_groups(model, M.parts(model))
    by_param = groups.set_index("param")
    assert by_param.loc["blocks.0.attn.qkv.weight", "group"] == "blocks.0.attn"
    assert by_param.loc["blocks.1.norm2.bias", "group"] == "blocks.1.norm2"
    assert by_param.loc["blocks.1.attn.prefix.down.weight", "group"] == "blocks.1.attn.prefix"
    assert by_param.loc["blocks.1.attn.prefix.down.weight", "part"] == "plugin"
    assert by_param.loc["cls_token", "group"] == "embed"
    assert by_param.loc["norm.weight", "group"] == "final_norm"
    modules = groups.drop_duplicates("group").set_index("group")["module"]
    assert modules["embed"] == "patch_embed"
    assert modules["head"] == "head"
    assert modules["final_norm"] == "norm"
    assert modules["blocks.1.attn.prefix"] == "blocks.1.attn.prefix"
    assert set(groups["param"]) == {n for n, _ in model.named_parameters()}


def test_parameter_groups_follow_the_blocks_of_every_stage():
    # Swin counts blocks over stages (layers.1.blocks.1 is block 2): a group is the block's child, found from
    # the block's module path, not from the block number written in the name.
    from test_families import tiny

    model = tiny("swin")  # depths (1, 2)
    table = M.parts(model)
    by_param = parameter_groups(model, table).set_index("param")
    assert by_param.loc["layers.1.blocks.1.attn.qkv.weight", "group"] == "layers.1.blocks.1.attn"
    assert by_param.loc["layers.1.blocks.0.mlp.fc1.weight", "group"] == "layers.1.blocks.0.mlp"
    assert by_param.loc["layers.0.blocks.0.norm1.weight", "group"] == "layers.0.blocks.0.norm1"
    assert block_paths(table) == {0: "layers.0.blocks.0", 1: "layers.1.blocks.0", 2: "layers.1.blocks.1"}
    local = table[table["part"] == "attn"]  # a cell's local rows: their groups need the whole table's blocks
    assert set(group_names(local, blocks=block_paths(table))) == {
        "layers.0.blocks.0.attn",
        "layers.1.blocks.0.attn",
        "layers.1.blocks.1.attn",
    }


def test_divergence_rows_summarise_each_part_over_its_blocks():
    model = _tiny_vit()
    groups = parameter_groups(model, M.parts(model))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ends = [{n: t + 0.1 * (i + 1) for n, t in start.items()} for i in range(2)]
    rows = pd.DataFrame(divergence_rows(5, [start, start], ends, groups))
    assert list(rows.columns) == ["round", "group", "part", "block", "metric", "value"]
    assert set(rows["metric"]) == {"update_cos", "rel_drift", "weight_div", "cka"}
    summary = rows[(rows["group"] == "norm") & (rows["metric"] == "rel_drift")]
    per_group = rows[(rows["part"] == "norm") & (rows["group"] != "norm") & (rows["metric"] == "rel_drift")]
    assert len(summary) == 1 and summary["block"].item() == -1
    assert len(per_group) == 5  # norm1, norm2 in two blocks and the final norm
    assert summary["value"].item() == pytest.approx(per_group["value"].mean())
    assert rows.duplicated(["round", "group", "metric"]).sum() == 0
    assert rows[rows["metric"] == "update_cos"]["value"].to_numpy() == pytest.approx(1.0)


# ---- the recorder as a federation hook ------------------------------------------------------


def _context(model: nn.Module, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=g)
    return SimpleNamespace(
        model=model,
        config=SimpleNamespace(seed=seed),
        device=torch.device("cpu"),
        dataset=SimpleNamespace(images=images),
        partition=SimpleNamespace(test=[np.arange(0, 10), np.arange(20, 30)]),
        parts=M.parts(model),
        prepare=lambda batch: batch.float() / 255.0,
    )


def _play_round(recorder, model, round, shifts):
    start = {n: p.detach().clone() for n, p in model.state_dict().items()}
    for client, shift in enumerate(shifts):
        model.load_state_dict(start)
        recorder.on_client_start(round, client, model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(shift(name, p))
        recorder.on_client_end(round, client, model)
    model.load_state_dict(start)
    return recorder.on_round_end(round)


def test_recorder_rows_for_identical_clients_and_leaves_the_model_as_it_was():
    model = _tiny_vit().train()
    recorder = DivergenceRecorder(every=2, probe_size=8)
    recorder.on_run_start(_context(model))
    same = lambda name, p: torch.full_like(p, 0.01)
    assert _play_round(recorder, model, 1, [same, same]) == []  # not a recorded round
    rows = pd.DataFrame(_play_round(recorder, model, 2, [same, same]))
    assert model.training and not any(m._forward_hooks for m in model.modules())
    assert set(rows["round"]) == {2}
    values = rows.pivot_table(index="group", columns="metric", values="value")
    assert values["update_cos"].to_numpy() == pytest.approx(1.0)
    assert values["weight_div"].to_numpy() == pytest.approx(0.0, abs=1e-12)
    assert values["cka"].to_numpy() == pytest.approx(1.0)
    expected = {"blocks.0.attn", "blocks.1.mlp", "blocks.0.norm1", "final_norm", "embed", "head", "attn", "norm"}
    assert expected <= set(values.index)


def test_recorder_sees_which_part_the_clients_pull_apart():
    model = _tiny_vit().train()
    recorder = DivergenceRecorder(probe_size=8)
    recorder.on_run_start(_context(model))
    g = torch.Generator().manual_seed(4)
    noise = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}

    def pulled(sign):
        return lambda name, p: sign * 0.5 * noise[name] if name.startswith("head") else torch.full_like(p, 0.001)

    rows = pd.DataFrame(_play_round(recorder, model, 0, [pulled(1.0), pulled(-1.0)]))
    values = rows.pivot_table(index="group", columns="metric", values="value")
    assert values.loc["head", "update_cos"] == pytest.approx(-1.0)
    assert values.loc["head", "weight_div"] > 0.1
    assert values.loc["head", "cka"] < values.loc["blocks.0.mlp", "cka"]
    assert values.loc["blocks.0.mlp", "weight_div"] == pytest.approx(0.0, abs=1e-6)


def test_recorder_probe_is_seeded_and_row_capped():
    model = _tiny_vit()
    first, second = DivergenceRecorder(probe_size=8, max_rows=10), DivergenceRecorder(probe_size=8, max_rows=10)
    first.on_run_start(_context(model))
    second.on_run_start(_context(model))
    assert torch.equal(first._probe, second._probe)
    features = first._probe_outputs(model)
    assert features["blocks.0.attn"].shape == (10, 48)  # 8 images x 5 tokens, capped at 10 rows
    assert features["head"].shape == (8, 3)
    assert torch.equal(features["blocks.0.attn"], second._probe_outputs(model)["blocks.0.attn"])


def test_a_plugin_never_called_through_forward_gets_no_cka_but_its_weight_metrics():
    model = _tiny_vit(plugin=True).train()
    recorder = DivergenceRecorder(probe_size=8)
    recorder.on_run_start(_context(model))
    g = torch.Generator().manual_seed(5)
    noise = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    shifts = [lambda name, p, s=s: s * 0.01 * noise[name] + 0.01 for s in (1.0, -1.0)]
    values = pd.DataFrame(_play_round(recorder, model, 1, shifts)).pivot_table(
        index="group", columns="metric", values="value", dropna=False
    )
    assert math.isnan(values.loc["blocks.1.attn.prefix", "cka"]) and math.isnan(values.loc["plugin", "cka"])
    assert values.loc["blocks.1.attn.prefix", ["update_cos", "rel_drift", "weight_div"]].notna().all()
    assert values.loc["blocks.1.attn", "cka"] > 0.5
