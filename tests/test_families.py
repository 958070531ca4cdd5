"""Model families: every parameter of a tiny variant of each family lands in exactly one part with the right
block; part specs work on each; FedPerfix and the vanilla prefix plug into each family's attention."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedsens.personalize import families, plugins
from fedsens.personalize import model as model_lib
from fedsens.personalize.errors import UserError
from fedsens.personalize.schema import PART_TYPES

FAMILIES = {family.name: family for family in families.all_families()}
# Variants that exercise each family's special structure (LayerScale, registers, attention-pool head ...).
VARIANTS = {
    "vit": dict(reg_tokens=2, init_values=1e-5, no_embed_class=True, global_pool="map", fc_norm=True),
    "deit-distilled": {},
    "swin": {},
    "swinv2": {},
    "eva": dict(init_values=0.1, scale_mlp=True, swiglu_mlp=True),
    "eva-separate": dict(qkv_fused=False, qkv_bias=True),
    "beit": dict(init_values=0.1),
    "cait": {},
}
FAMILY_OF_VARIANT = {"eva-separate": "eva"}


def tiny(variant: str, *, classes: int = 3, seed: int = 0) -> nn.Module:
    family = FAMILIES[FAMILY_OF_VARIANT.get(variant, variant)]
    args = {**family.tiny, **VARIANTS[variant]}
    size = args.pop("img_size")
    return model_lib.build(family.examples[0], classes, 3, size, model_args=args, seed=seed)


def test_every_family_is_listed_with_example_names_and_a_tiny_variant():
    assert set(FAMILIES) == {"vit", "deit-distilled", "swin", "swinv2", "eva", "beit", "cait"}
    for family in FAMILIES.values():
        assert families.for_name(family.examples[0]) is not None and family.tiny


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_parameter_lands_in_exactly_one_part_of_its_block(variant):
    model = tiny(variant)
    table = model_lib.parts(model)
    assert table["param"].tolist() == [name for name, _ in model.named_parameters()]
    assert set(table["part"]) <= set(PART_TYPES) - {"plugin"}
    assert table["numel"].sum() == sum(p.numel() for p in model.parameters())
    blocks = families.of(model).blocks(model)
    for index, (path, _) in enumerate(blocks):  # a block's parameters carry its depth-order index, nothing else
        inside = table["param"].str.startswith(path + ".")
        assert inside.any() and (table.loc[inside, "block"] == index).all()
    assert (table.loc[table["block"] >= 0, "block"].isin(range(len(blocks)))).all()
    assert {"attn", "mlp", "norm", "head", "embed"} <= set(table["part"])


def _part(table, name):
    return table.set_index("param").loc[name, "part"]


def test_vit_layerscale_registers_pool_head_and_fc_norm():
    table = model_lib.parts(tiny("vit"))
    assert _part(table, "reg_token") == "embed" and _part(table, "pos_embed") == "embed"
    assert _part(table, "blocks.1.ls1.gamma") == "attn" and _part(table, "blocks.1.ls2.gamma") == "mlp"
    assert _part(table, "fc_norm.weight") == "norm"
    pool = table[table["param"].str.startswith("attn_pool.")]
    assert len(pool) and (pool["part"] == "head").all() and (pool["block"] == -1).all()


def test_distilled_deit_token_is_embed_and_both_heads_are_head():
    table = model_lib.parts(tiny("deit-distilled"))
    assert _part(table, "dist_token") == "embed"
    assert _part(table, "head_dist.weight") == "head" and _part(table, "head.weight") == "head"


@pytest.mark.parametrize("variant", ["swin", "swinv2"])
def test_swin_counts_blocks_over_stages_with_a_stage_column(variant):
    table = model_lib.parts(tiny(variant))  # depths (1, 2): layers.0.blocks.0, layers.1.blocks.0/1
    assert list(table.columns) == ["param", "part", "block", "stage", "numel", "bytes"]
    row = table.set_index("param")
    assert row.loc["layers.1.blocks.1.mlp.fc1.weight", "block"] == 2
    assert row.loc["layers.1.blocks.1.mlp.fc1.weight", "stage"] == 1
    assert row.loc["layers.0.blocks.0.attn.qkv.weight", ["block", "stage"]].tolist() == [0, 0]
    downsample = table[table["param"].str.startswith("layers.1.downsample.")]
    assert len(downsample) and (downsample["part"] == "embed").all() and (downsample["block"] == -1).all()
    assert (downsample["stage"] == 1).all()
    position = "relative_position_bias_table" if variant == "swin" else "cpb_mlp.0.weight"
    assert row.loc[f"layers.1.blocks.0.attn.{position}", "part"] == "attn"
    if variant == "swinv2":
        assert row.loc["layers.1.blocks.0.attn.logit_scale", "part"] == "attn"
        assert row.loc["layers.1.blocks.0.attn.q_bias", "part"] == "attn"


def test_eva_biases_swiglu_and_layerscale():
    table = model_lib.parts(tiny("eva"))
    assert _part(table, "blocks.0.attn.q_bias") == "attn" and _part(table, "blocks.0.attn.v_bias") == "attn"
    assert _part(table, "blocks.0.mlp.fc1_g.weight") == "mlp" and _part(table, "blocks.0.mlp.fc1_x.weight") == "mlp"
    assert _part(table, "blocks.0.gamma_1") == "attn" and _part(table, "blocks.0.gamma_2") == "mlp"
    separate = model_lib.parts(tiny("eva-separate"))
    assert {_part(separate, f"blocks.1.attn.{p}_proj.weight") for p in "qkv"} == {"attn"}


def test_beit_relative_position_bias_and_gammas():
    table = model_lib.parts(tiny("beit"))
    assert _part(table, "blocks.1.attn.relative_position_bias_table") == "attn"
    assert _part(table, "blocks.1.gamma_1") == "attn" and _part(table, "blocks.1.gamma_2") == "mlp"


def test_cait_class_attention_blocks_follow_the_self_attention_blocks():
    table = model_lib.parts(tiny("cait")).set_index("param")  # depth 2, one class-attention block
    assert table.loc["blocks_token_only.0.attn.k.weight", ["part", "block"]].tolist() == ["attn", 2]
    assert table.loc["blocks.1.attn.proj_l.weight", ["part", "block"]].tolist() == ["attn", 1]
    assert table.loc["blocks_token_only.0.gamma_1", "part"] == "attn"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_part_specs_work_on_every_family(variant):
    model = tiny(variant)
    table = model_lib.parts(model)
    last = model_lib.depth(model) - 1  # a range past the last block is an error (blocks.resolve_blocks)
    attn_late = model_lib.resolve(model, f"attn@1-{last}")
    late = range(1, last + 1)
    assert attn_late == table.loc[(table["part"] == "attn") & table["block"].isin(late), "param"].tolist()
    block1 = model_lib.resolve(model, "blocks.1")
    assert block1 == table.loc[table["block"] == 1, "param"].tolist()
    attention = model_lib.resolve(model, "blocks.1.attn")  # the attention module of block 1 (not its LayerScale)
    assert attention and set(attention) <= set(attn_late) & set(block1)
    assert all(".attn." in name for name in attention)
    assert set(model_lib.resolve(model, "head")) == set(table.loc[table["part"] == "head", "param"])
    with pytest.raises(UserError, match="matches no parameter"):
        model_lib.resolve(model, "blocks.99")


def test_per_block_cells_count_the_blocks_of_any_family():
    from fedsens.sensitivity.sweep import per_block_parts

    swin = FAMILIES["swin"]  # depths (1, 2): three blocks over two stages
    assert per_block_parts(swin.examples[0], ("attn",), swin.tiny) == ("attn@0", "attn@1", "attn@2")
    cait = FAMILIES["cait"]  # two self-attention blocks and one class-attention block
    assert len(per_block_parts(cait.examples[0], ("mlp",), cait.tiny)) == 3


def test_a_name_outside_the_families_is_one_line_naming_them():
    with pytest.raises(UserError, match=r"resnet18.*vit: vit_small_patch16_224.*swin: swin_tiny"):
        model_lib.build("resnet18", 3, 3, 32)
    with pytest.raises(UserError, match="--model-arg bogus: .* does not take it"):
        model_lib.build("deit_tiny_patch16_224", 3, 3, 32, model_args={"bogus": 1})


# --- plugins on every family's attention -------------------------------------------------------------


def _double(variant: str) -> nn.Module:
    model = tiny(variant).double().eval()
    with torch.no_grad():  # non-zero q/v biases, so the bias paths matter
        for name, p in model.named_parameters():
            if name.endswith(("q_bias", "v_bias")):
                p.copy_(torch.linspace(-0.5, 0.5, p.numel(), dtype=p.dtype))
    return model


def _tokens(attn: nn.Module, model: nn.Module) -> torch.Tensor:
    where = plugins.projections(attn)
    assert where is not None
    n = 5
    if getattr(attn, "window_size", None) is not None:  # Swin: one window of tokens; BEiT: the grid and its cls
        n = attn.window_size[0] * attn.window_size[1] + type(attn).__module__.endswith("beit")
    return torch.randn(2, n, where.dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _fresh(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A new Linear (no hooks) with the given weight and bias."""
    linear = nn.Linear(old.in_features, old.out_features, bias=bias is not None, dtype=torch.float64)
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)
    return linear


def _fold_linear_prefix(attn: nn.Module, scale: float) -> nn.Module:
    """An unplugged copy of `attn` whose own key/value projections include the vanilla prefix's linear map:
    k' = (W_k + s P_k) x + b_k + s p_k, the same for v. The formula, written into timm's own weights."""
    prefix = attn.prefix.proj
    reference = copy.deepcopy(attn)
    del reference.prefix
    dim = prefix.out_features // 2
    weight, bias = prefix.weight * scale, prefix.bias * scale
    zero = torch.zeros(dim, dtype=torch.float64)
    with torch.no_grad():
        where = plugins.projections(reference)
        if where.fused is not None:
            folded = where.fused.weight + torch.cat([torch.zeros_like(weight[:dim]), weight])
            if getattr(reference, "q_bias", None) is not None:  # q/k/v biases live beside qkv: fold there
                reference.k_bias += bias[:dim]
                reference.v_bias += bias[dim:]
                reference.qkv = _fresh(where.fused, folded, None)
            else:
                reference.qkv = _fresh(where.fused, folded, where.fused.bias + torch.cat([zero, bias]))
        else:
            names = ("k_proj", "v_proj") if hasattr(reference, "k_proj") else ("k", "v")
            for name, old, half in zip(names, (where.key, where.value), (slice(None, dim), slice(dim, None))):
                own = old.bias if old.bias is not None else zero
                setattr(reference, name, _fresh(old, old.weight + weight[half], own + bias[half]))
    return reference


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_vanilla_prefix_on_each_familys_attention_is_its_formula_fp64(variant):
    model = _double(variant)
    plugins.install(model, "vanilla-prefix", init="random", scale=1.5, seed=5)
    attentions = families.of(model).attentions(model)
    assert attentions and all(isinstance(getattr(a, "prefix", None), plugins.LinearPrefix) for _, a in attentions)
    for _, attn in attentions:
        x = _tokens(attn, model)
        reference = _fold_linear_prefix(attn, 1.5)
        difference = (attn(x) - reference(x)).abs().max().item()
        assert difference <= 1e-10, (variant, difference)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fedperfix_offsets_reach_only_keys_and_values_on_each_family_fp64(variant):
    model = _double(variant)
    plain = copy.deepcopy(model)
    plugins.install(model, "fedperfix", mid_dim=8, scale=1.5, seed=5)
    for (name, attn), (_, original) in zip(families.of(model).attentions(model), families.of(plain).attentions(plain)):
        x = _tokens(attn, model)
        offsets = 1.5 * attn.prefix.up(torch.tanh(attn.prefix.down(x)))  # the FedPerfix adapter's formula
        k_off, v_off = offsets.chunk(2, dim=-1)
        where, before = plugins.projections(attn), plugins.projections(original)
        if where.fused is not None:
            expected = before.fused(x) + torch.cat([torch.zeros_like(k_off), k_off, v_off], dim=-1)
            assert (where.fused(x) - expected).abs().max().item() <= 1e-10
        else:
            assert (where.key(x) - (before.key(x) + k_off)).abs().max().item() <= 1e-10
            assert (where.value(x) - (before.value(x) + v_off)).abs().max().item() <= 1e-10
        changed = (attn(x) - original(x)).abs().max().item()
        assert changed > 1e-6, name  # the offsets change the attention's output


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_zero_vanilla_prefix_leaves_every_family_unchanged(variant):
    model = _double(variant)
    side = FAMILIES[FAMILY_OF_VARIANT.get(variant, variant)].tiny["img_size"]
    x = torch.randn(2, 3, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    before = model(x)
    plugins.install(model, "vanilla-prefix", init="zero")
    assert (model(x) - before).abs().max().item() <= 1e-12
    assert set(model_lib.resolve(model, "plugin")) == {n for n, _ in model.named_parameters() if ".prefix." in n}
