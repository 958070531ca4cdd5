"""Attention plugins: the FedPerfix formula on timm's own attention, fused = unfused, names kept, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

from fedsens.personalize import model as model_lib
from fedsens.personalize import plugins
from fedsens.personalize.errors import UserError

DIM, HEADS, DEPTH = 48, 4, 3


def tiny_vit() -> VisionTransformer:
    model = VisionTransformer(
        img_size=8,
        patch_size=4,
        in_chans=3,
        num_classes=5,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        qkv_bias=True,
    )
    return model.eval()


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def tokens(batch: int = 2, n: int = 5) -> torch.Tensor:
    return torch.randn(batch, n, DIM, generator=torch.Generator().manual_seed(2))


def plain_attention(attn, x, key_offset=None, value_offset=None, prefix_keys=None, prefix_values=None, mask=None):
    """Multi-head self-attention written out from the shared weights, with optional K/V changes.

    `mask` (N x N bool, True = may attend) applies to the real tokens; prefix tokens are always visible.
    """
    batch, n, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(DIM, dim=-1)
    if key_offset is not None:
        k, v = k + key_offset, v + value_offset

    def per_head(t):
        return t.reshape(batch, -1, heads, head_dim).transpose(1, 2)

    q, k, v = per_head(q), per_head(k), per_head(v)
    if prefix_keys is not None:
        k = torch.cat([prefix_keys.expand(batch, -1, -1, -1), k], dim=2)
        v = torch.cat([prefix_values.expand(batch, -1, -1, -1), v], dim=2)
    scores = q @ k.transpose(-2, -1) / head_dim**0.5
    if mask is not None:
        visible = torch.cat([torch.ones(n, k.shape[2] - n, dtype=torch.bool), mask], dim=1)
        scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    mixed = (weights @ v).transpose(1, 2).reshape(batch, n, DIM)
    return mixed @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("fused", [True, False])
def test_fedperfix_attention_matches_its_formula(fused):
    model = tiny_vit()
    plugins.install(model, "fedperfix", mid_dim=16, scale=1.5, seed=3)
    attn = model.blocks[1].attn
    attn.fused_attn = fused
    x = tokens()
    offsets = attn.prefix.up(torch.tanh(attn.prefix.down(x)))
    expected = plain_attention(attn, x, 1.5 * offsets[..., :DIM], 1.5 * offsets[..., DIM:])
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_fedperfix_leaves_queries_unchanged():
    model = tiny_vit()
    plugins.install(model, "fedperfix", mid_dim=16, seed=3)
    attn, x = model.blocks[0].attn, tokens()
    shifted = attn.qkv(x)  # through the plugin's hook
    plain = torch.nn.functional.linear(x, attn.qkv.weight, attn.qkv.bias)
    assert torch.equal(shifted[..., :DIM], plain[..., :DIM])
    assert not torch.allclose(shifted[..., DIM:], plain[..., DIM:])


@pytest.mark.parametrize("kind", plugins.KINDS)
def test_fused_and_unfused_paths_agree(kind):
    model = tiny_vit()
    plugins.install(model, kind, mid_dim=16, init="random", seed=4)
    x = images()
    fused = model(x)
    for block in model.blocks:
        block.attn.fused_attn = False
    torch.testing.assert_close(model(x), fused, rtol=1e-5, atol=1e-5)


def test_timms_attention_module_and_forward_stay_in_place():
    model = tiny_vit()
    plugins.install(model, "fedperfix", mid_dim=16)
    for block in model.blocks:
        assert type(block.attn) is Attention and type(block.attn).forward is Attention.forward


def test_a_deep_copy_runs_its_own_plugin():
    model = tiny_vit()
    plugins.install(model, "fedperfix", mid_dim=16, seed=3)
    twin = copy.deepcopy(model)
    before = model(images())
    torch.testing.assert_close(twin(images()), before, rtol=0, atol=0)
    with torch.no_grad():
        for block in twin.blocks:
            block.attn.prefix.up.weight.mul_(3.0)
    torch.testing.assert_close(model(images()), before, rtol=0, atol=0)  # the original's hooks use its own plugins
    assert not torch.allclose(twin(images()), before, atol=1e-4)


def test_scale_zero_gives_the_plain_vit():
    plain = tiny_vit()
    plugged = copy.deepcopy(plain)
    plugins.install(plugged, "fedperfix", mid_dim=16, scale=0.0)
    torch.testing.assert_close(plugged(images()), plain(images()), rtol=0, atol=1e-6)


def test_zero_vanilla_prefix_starts_as_the_plain_vit_and_random_does_not():
    plain = tiny_vit()
    zero, random = copy.deepcopy(plain), copy.deepcopy(plain)
    plugins.install(zero, "vanilla-prefix", init="zero")
    plugins.install(random, "vanilla-prefix", init="random")
    torch.testing.assert_close(zero(images()), plain(images()), rtol=0, atol=1e-6)
    assert not torch.allclose(random(images()), plain(images()), atol=1e-4)


def test_vanilla_prefix_offsets_are_one_linear_map():
    model = tiny_vit()
    plugins.install(model, "vanilla-prefix", init="random", scale=0.7)
    attn, x = model.blocks[2].attn, tokens()
    offsets = attn.prefix.proj(x)
    expected = plain_attention(attn, x, 0.7 * offsets[..., :DIM], 0.7 * offsets[..., DIM:])
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", plugins.KINDS)
def test_original_parameters_keep_names_and_identity(kind):
    model = tiny_vit()
    before = dict(model.named_parameters())
    added = plugins.install(model, kind, mid_dim=16)
    after = dict(model.named_parameters())
    assert set(after) == set(before) | set(added)
    assert all(after[name] is parameter for name, parameter in before.items())
    assert added and all(".attn.prefix." in name for name in added)
    assert set(model.state_dict()) == set(after)  # no buffers or aliases added


def test_plugin_names_read_well():
    model = tiny_vit()
    names = plugins.install(model, "fedperfix", mid_dim=16)
    assert "blocks.2.attn.prefix.down.weight" in names
    assert "blocks.0.attn.prefix.up.bias" in names
    assert "blocks.1.attn.prefix.proj.weight" in plugins.install(tiny_vit(), "vanilla-prefix")


def test_every_added_parameter_belongs_to_a_plugin_module():
    model = tiny_vit()
    added = plugins.install(model, "fedperfix", mid_dim=16)
    for name in added:
        owner = model.get_submodule(name[: name.index(".prefix") + len(".prefix")])
        assert owner.fedsens_part == "plugin"
    assert not hasattr(model.blocks[0].attn, "fedsens_part")


@pytest.mark.parametrize("kind", plugins.KINDS)
def test_plugins_add_only_plugin_parameters_and_keep_the_other_parts(kind):
    model = tiny_vit()
    before = model_lib.parts(model).set_index("param")["part"]
    added = plugins.install(model, kind, mid_dim=16)
    after = model_lib.parts(model).set_index("param")["part"]
    assert (after[added] == "plugin").all()
    assert after.drop(added).equals(before)
    assert sorted(model_lib.resolve(model, "plugin")) == sorted(added)
    assert not set(model_lib.resolve(model, "attn")) & set(added)


@pytest.mark.parametrize(("blocks", "plugged"), [("all", {0, 1, 2}), ("2", {2}), ("0,2", {0, 2}), ("1-2", {1, 2})])
def test_blocks_choose_the_attention_layers_that_get_a_plugin(blocks, plugged):
    plain = tiny_vit()
    model = copy.deepcopy(plain)
    names = plugins.install(model, "fedperfix", mid_dim=16, blocks=blocks)
    assert {int(name.split(".")[1]) for name in names} == plugged
    x = tokens()
    for index in range(DEPTH):
        same = torch.equal(model.blocks[index].attn(x), plain.blocks[index].attn(x))
        assert same is (index not in plugged), index


def test_default_sizes_follow_the_public_code():
    model = tiny_vit()
    plugins.install(model, "fedperfix")
    adapter = model.blocks[0].attn.prefix
    assert (adapter.down.in_features, adapter.down.out_features, adapter.up.out_features) == (DIM, 256, 2 * DIM)
    assert adapter.scale == 1.5
    assert adapter.down.weight.abs().sum() > 0 and adapter.up.weight.abs().sum() > 0  # not zero-initialised


def test_initialisation_is_seeded():
    first, second, other = tiny_vit(), tiny_vit(), tiny_vit()
    for model, seed in ((first, 7), (second, 7), (other, 8)):
        plugins.install(model, "fedperfix", mid_dim=16, seed=seed)
    up = lambda model: model.blocks[0].attn.prefix.up.weight  # noqa: E731
    assert torch.equal(up(first), up(second))
    assert not torch.equal(up(first), up(other))


@pytest.mark.parametrize("kind", plugins.KINDS)
def test_backward_reaches_the_plugin(kind):
    model = tiny_vit().train()
    added = plugins.install(model, kind, mid_dim=16, init="random")
    model(images()).logsumexp(-1).sum().backward()
    parameters = dict(model.named_parameters())
    for name in added:
        assert parameters[name].grad is not None and parameters[name].grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("kind", "options", "message"),
    [
        ("lora", {}, "unknown plugin 'lora'"),
        ("fedperfix", {"blocks": "x"}, "blocks 'x'"),
        ("fedperfix", {"blocks": f"1-{DEPTH}"}, f"block {DEPTH} does not exist; the model has blocks 0-{DEPTH - 1}"),
        ("fedperfix", {"blocks": "2-1"}, "runs backwards"),
        ("fedperfix", {"mid_dim": 0}, "mid_dim 0"),
        ("vanilla-prefix", {"init": "ones"}, "init 'ones'"),
    ],
)
def test_bad_options_raise_user_errors(kind, options, message):
    with pytest.raises(UserError, match=message):
        plugins.install(tiny_vit(), kind, **options)


def test_installing_twice_is_refused():
    model = tiny_vit()
    plugins.install(model, "fedperfix", mid_dim=16)
    with pytest.raises(UserError, match="already has attention plugins"):
        plugins.install(model, "vanilla-prefix")


def test_a_model_without_attention_is_refused():
    with pytest.raises(UserError, match="no attention module a plugin fits"):
        plugins.install(torch.nn.Linear(3, 3), "fedperfix")
