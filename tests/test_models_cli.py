"""`fedsens models`, and --model NAME --model-arg/--weights on `fedsens train`: through typer's runner."""

from __future__ import annotations

import json

from safetensors.torch import save_file
from typer.testing import CliRunner

from fedsens.cli import app
from fedsens.personalize import model as model_lib

runner = CliRunner()
SWIN = ["--model-arg", "img_size=32", "--model-arg", "window_size=4", "--model-arg", "embed_dim=16"]
SWIN += ["--model-arg", "depths=1,2", "--model-arg", "num_heads=1,2"]


def test_models_lists_every_family_with_example_names():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    for name in ("vit", "deit-distilled", "swin", "swinv2", "eva", "beit", "cait"):
        assert f"  {name}: " in result.output
    assert "swin_tiny_patch4_window7_224" in result.output and "vit-micro" in result.output


def test_models_name_prints_the_manifest_per_part_and_block():
    result = runner.invoke(app, ["models", "swin_tiny_patch4_window7_224", *SWIN, "--classes", "4"])
    assert result.exit_code == 0, result.output
    assert "family swin (SwinTransformer)" in result.output and "3 blocks, 4 classes" in result.output
    assert "per part:" in result.output and "per block" in result.output and "stage" in result.output
    model = model_lib.build(
        "swin_tiny_patch4_window7_224",
        4,
        3,
        32,
        model_args={"window_size": 4, "embed_dim": 16, "depths": [1, 2], "num_heads": [1, 2]},
    )
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in result.output


def test_bad_model_names_and_arguments_are_one_line():
    for args, message in (
        (["models", "resnet18"], "neither a fedsens preset nor a timm model of a supported family"),
        (
            ["models", "deit_tiny_patch16_224", "--model-arg", "wings=2"],
            "--model-arg wings: deit_tiny_patch16_224 does not take it",
        ),
        (["models", "deit_tiny_patch16_224", "--model-arg", "depth"], "is not KEY=VALUE"),
        (["models", "deit_tiny_patch16_224", "--model-arg", "num_classes=3"], "set by fedsens itself"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output


def test_train_a_tiny_swin_from_a_weights_file(tmp_path):
    args = {"window_size": 4, "embed_dim": 16, "depths": [1, 2], "num_heads": [1, 2]}
    source = model_lib.build("swin_tiny_patch4_window7_224", 7, 3, 32, model_args=args)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "swin.safetensors"))
    result = runner.invoke(
        app,
        [
            "train",
            "--model",
            "swin_tiny_patch4_window7_224",
            *SWIN,
            "--weights",
            str(tmp_path / "swin.safetensors"),
            "--dataset",
            "synthetic",
            "--clients",
            "4",
            "--rounds",
            "1",
            "--local-steps",
            "1",
            "--method",
            "fedperfix",
            "-o",
            "mid_dim=4",
            "--out",
            str(tmp_path / "run"),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "weights sha256" in result.output and "model args" in result.output
    protocol = json.loads((tmp_path / "run" / "protocol.json").read_text())
    assert protocol["weights"].endswith("swin.safetensors") and len(protocol["weights_sha256"]) == 64
    assert protocol["mean"] == "0.485, 0.456, 0.406" and protocol["input_size"] == "3x32x32"
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert config["model_args"] == {
        "img_size": 32,
        "window_size": 4,
        "embed_dim": 16,
        "depths": [1, 2],
        "num_heads": [1, 2],
    }
