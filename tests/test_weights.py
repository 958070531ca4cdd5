"""Weights through timm's own loading: a file written here loads into a run with another class count (every
non-head tensor equals the file, the head is the seeded init); position embeddings are resampled; another
architecture's file is one line naming the first mismatching tensor; --pretrained never reaches the network."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file

from fedsens.personalize import model as model_lib
from fedsens.personalize import presets, weights
from fedsens.personalize.config import RunConfig
from fedsens.personalize.errors import UserError

NAME = "deit_tiny_patch16_224"
ARGS = {"patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2}


def _source(tmp_path, suffix: str, *, classes: int = 7, img_size: int = 32):
    source = model_lib.build(NAME, classes, 3, img_size, model_args=ARGS, seed=11)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return source, path


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_weights_file_loads_into_a_run_with_another_class_count(tmp_path, suffix):
    source, path = _source(tmp_path, suffix)
    loaded = model_lib.build(NAME, 3, 3, 32, model_args=ARGS, weights=path, seed=5)
    scratch = model_lib.build(NAME, 3, 3, 32, model_args=ARGS, seed=5)
    expected = source.state_dict()
    for name, tensor in loaded.state_dict().items():
        if name.startswith("head."):
            assert torch.equal(tensor, scratch.state_dict()[name])  # the run's seeded init, not the file's
            assert tensor.shape[0] == 3
        else:
            assert torch.equal(tensor, expected[name]), name
    again = model_lib.build(NAME, 3, 3, 32, model_args=ARGS, weights=path, seed=5)
    assert torch.equal(again.head.weight, loaded.head.weight)


def test_the_same_class_count_keeps_the_files_head(tmp_path):
    source, path = _source(tmp_path, ".safetensors", classes=3)
    loaded = model_lib.build(NAME, 3, 3, 32, model_args=ARGS, weights=path, seed=5)
    assert torch.equal(loaded.head.weight, source.head.weight)


def test_position_embeddings_are_resampled_to_the_input_size(tmp_path):
    _, path = _source(tmp_path, ".safetensors", img_size=32)
    loaded = model_lib.build(NAME, 3, 3, 48, model_args=ARGS, weights=path)
    assert loaded.pos_embed.shape[1] == 1 + (48 // 8) ** 2


def test_another_architecture_names_the_first_mismatching_tensor(tmp_path):
    _, path = _source(tmp_path, ".safetensors")
    with pytest.raises(UserError, match="first mismatching tensor cls_token"):
        model_lib.build(NAME, 3, 3, 32, model_args={**ARGS, "embed_dim": 32}, weights=path)
    with pytest.raises(UserError, match="first mismatching tensor blocks.2"):
        model_lib.build(NAME, 3, 3, 32, model_args={**ARGS, "depth": 3}, weights=path)
    with pytest.raises(UserError, match="does not exist"):
        model_lib.build(NAME, 3, 3, 32, model_args=ARGS, weights=tmp_path / "missing.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights file"):
        model_lib.build(NAME, 3, 3, 32, model_args=ARGS, weights=tmp_path / "junk.pt")


def test_pretrained_without_a_cached_copy_stops_at_once_naming_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "_hub_cache", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    start = time.monotonic()
    with pytest.raises(UserError, match=f"no cached weights for {NAME} in the Hugging Face cache {tmp_path}/hub"):
        model_lib.build(NAME, 3, 3, 32, model_args=ARGS, pretrained=True)
    assert time.monotonic() - start < 5


def test_pretrained_reads_the_cached_file_offline(tmp_path, monkeypatch):
    source, path = _source(tmp_path, ".safetensors")
    seen = {}

    def cached(name):
        seen["name"] = name
        return path

    monkeypatch.setattr(weights, "cached_file", cached)
    loaded = model_lib.build(NAME, 3, 3, 32, model_args=ARGS, pretrained=True)
    assert seen["name"] == NAME and torch.equal(loaded.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)


def test_the_protocol_keeps_the_data_config_and_the_weights_sha256(tmp_path):
    _, path = _source(tmp_path, ".safetensors")
    config = RunConfig(model=NAME, model_args={**ARGS, "img_size": 32}, weights=str(path), out=str(tmp_path))
    record = presets.protocol(config)
    assert record["weights_sha256"] == weights.sha256(path) and len(record["weights_sha256"]) == 64
    assert record["input_size"] == "3x32x32" and record["interpolation"] == "bicubic"
    assert record["mean"] == "0.485, 0.456, 0.406" and record["image_size"] == 32
    assert record["model_args"] == "patch_size=8 embed_dim=24 depth=2 num_heads=2 img_size=32"
    plain = presets.protocol(RunConfig())
    assert not {"weights", "weights_sha256", "model_args", "mean"} & set(plain)
    with pytest.raises(UserError, match="not both"):
        RunConfig(model=NAME, weights=str(path), pretrained=True)
