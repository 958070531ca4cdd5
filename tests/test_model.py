"""The layer-type taxonomy and part specs on real timm ViTs."""

import pytest
import torch
from torch import nn

from fedsens.personalize import model as M
from fedsens.personalize.errors import UserError


@pytest.fixture(scope="module")
def vit():
    return M.build("vit-micro", 10, 1, 8, patch_size=2, seed=0)


def test_every_parameter_has_exactly_one_known_part(vit):
    table = M.parts(vit)
    assert list(table["param"]) == [n for n, _ in vit.named_parameters()]
    assert set(table["part"]) == {"embed", "attn", "mlp", "norm", "head"}
    assert table["numel"].sum() == sum(p.numel() for p in vit.parameters())
    by_part = table.groupby("part")["param"].apply(set)
    assert by_part["head"] == {"head.weight", "head.bias"}
    assert by_part["embed"] == {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert "norm.weight" in by_part["norm"] and "blocks.0.norm1.weight" in by_part["norm"]
    assert by_part["attn"] == {
        f"blocks.{b}.attn.{l}.{k}" for b in range(4) for l in ("qkv", "proj") for k in ("weight", "bias")
    }
    assert all(name.startswith("blocks.") and ".mlp.fc" in name for name in by_part["mlp"])


def test_blocks_are_indexed(vit):
    table = M.parts(vit).set_index("param")
    assert table.loc["blocks.3.mlp.fc2.weight", "block"] == 3
    assert table.loc["head.weight", "block"] == -1


def test_specs_resolve_to_the_expected_parameters(vit):
    assert M.resolve(vit, "none") == []
    assert len(M.resolve(vit, "all")) == len(list(vit.parameters()))
    assert set(M.resolve(vit, "attn,head")) == {n for n in M.resolve(vit, "attn")} | {"head.weight", "head.bias"}
    assert set(M.resolve(vit, "attn@2-3")) == {
        f"blocks.{b}.attn.{l}.{k}" for b in (2, 3) for l in ("qkv", "proj") for k in ("weight", "bias")
    }
    assert all(n.startswith("blocks.3.") for n in M.resolve(vit, "blocks.3"))
    assert len(M.resolve(vit, "blocks.3")) == 12


def test_module_path_spec_matches_whole_components():
    # blocks.1 must not catch blocks.10 .. blocks.11
    deep = M.build("vit-nano", 10, 1, 8, patch_size=2)
    deep.blocks.extend([type(deep.blocks[0])(48, 3) for _ in range(10)])
    names = M.resolve(deep, "blocks.1")
    assert names and all(n.startswith("blocks.1.") for n in names)


class _Heads(nn.Module):
    fedsens_part = "plugin"

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


def test_head_does_not_catch_heads_and_plugins_inside_attention_are_plugins(vit):
    model = M.build("vit-nano", 10, 1, 8, patch_size=2)
    model.heads = _Heads()
    model.blocks[0].attn.prefix = _Heads()
    table = M.parts(model).set_index("param")
    assert set(M.resolve(model, "head")) == {"head.weight", "head.bias"}
    assert table.loc["heads.proj.weight", "part"] == "plugin"
    assert table.loc["blocks.0.attn.prefix.proj.weight", "part"] == "plugin"
    assert table.loc["blocks.0.attn.qkv.weight", "part"] == "attn"
    assert set(M.resolve(model, "plugin")) == {
        "heads.proj.weight",
        "heads.proj.bias",
        "blocks.0.attn.prefix.proj.weight",
        "blocks.0.attn.prefix.proj.bias",
    }


@pytest.mark.parametrize("spec", ["heads", "attn@7-9", "blocks.9", "plugin", "none,head", "", "attn@3-1"])
def test_specs_that_match_nothing_or_are_malformed_are_user_errors(vit, spec):
    with pytest.raises(UserError):
        M.resolve(vit, spec)


def test_manifest_marks_local_and_describe_summarises(vit):
    table = M.manifest(vit, "head")
    assert table["local"].sum() == 2
    text = M.describe(table)
    assert "local: 970 params" in text and "head=970" in text


def test_build_is_seeded_without_touching_the_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = M.build("vit-nano", 10, 1, 8, patch_size=2, seed=5)
    after = torch.rand(1)
    b = M.build("vit-nano", 10, 1, 8, patch_size=2, seed=5)
    assert torch.equal(before, after)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_input_spec_adapts_small_presets_to_the_data():
    assert M.input_spec("vit-micro", data_channels=1, data_size=8) == M.InputSpec(8, 4, 1)
    assert M.input_spec("vit-micro", data_channels=1, data_size=28) == M.InputSpec(28, 4, 1)
    assert M.input_spec("vit-micro", data_channels=3, data_size=30) == M.InputSpec(32, 4, 3)
    assert M.input_spec("vit_small_patch16_224", data_channels=1, data_size=28) == M.InputSpec(224, 16, 3)
    with pytest.raises(UserError):
        M.model_shape("vit-huge")


def test_a_block_range_past_the_models_depth_names_the_missing_blocks():
    vit = M.build("vit-nano", 10, 3, 16, patch_size=4)  # 2 blocks
    with pytest.raises(
        UserError, match=r"^part spec term 'attn@0-99': blocks 2-99 do not exist; the model has blocks 0-1$"
    ):
        M.resolve(vit, "attn@0-99")
    assert M.resolve(vit, "attn@0-1") == M.resolve(vit, "attn")


def test_one_grammar_for_part_specs_and_plugin_blocks():
    from fedsens.personalize.blocks import parse_blocks, spans

    assert parse_blocks("0, 9-11,3", what="x") == (0, 3, 9, 10, 11) and parse_blocks("all", what="x") is None
    assert spans([5, 2, 3, 7, 8, 9]) == "2-3, 5, 7-9"
    for bad in ("x", "1-", "3-1", ""):
        with pytest.raises(UserError, match="^x: "):
            parse_blocks(bad, what="x")


def test_train_says_in_one_line_which_blocks_do_not_exist(tmp_path):
    from typer.testing import CliRunner

    from fedsens.cli import app

    args = ["train", "--dataset", "synthetic", "--model", "vit-nano", "--clients", "4", "--rounds", "1", "--quiet"]
    result = CliRunner().invoke(app, [*args, "--personalize", "attn@0-99", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (
        "error: part spec term 'attn@0-99': blocks 2-99 do not exist; the model has blocks 0-1"
    )
