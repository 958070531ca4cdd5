"""`fedsens train` through typer's runner."""

import json

from typer.testing import CliRunner

from fedsens.cli import app

TINY = ["--dataset", "synthetic", "--model", "vit-nano", "--clients", "4", "--rounds", "1", "--quiet"]


def test_train_writes_the_tables_and_reports_accuracy(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", *TINY, "--personalize", "attn,head", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "mean client accuracy" in result.output
    for name in ("config.json", "partition.json", "parts.csv", "metrics.csv", "rounds.csv", "summary.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "config.json").read_text())["config"]["personalize"] == "attn,head"


def test_bad_input_is_one_clear_line_and_exit_2(tmp_path):
    runner = CliRunner()
    for args, fragment in [
        (["--personalize", "heads"], "matches no parameter"),
        (["--alpha", "0"], "alpha must be > 0"),
        (["--personalize", "auto"], "--from"),
        (["--dataset", "imagenet"], "imagenet"),
    ]:
        result = runner.invoke(app, ["train", *TINY, "--out", str(tmp_path / "x"), "--overwrite", *args])
        assert result.exit_code == 2, (args, result.output)
        assert fragment in result.output
        assert "Traceback" not in result.output


def test_fedperfix_placed_by_a_sweep_records_its_placement(tmp_path):
    import pandas as pd

    sweep = tmp_path / "sweep"
    (sweep / "cells" / "s0-none").mkdir(parents=True)
    ranked = ["head", "embed", "attn", "mlp"]
    pd.DataFrame(
        [dict(part=p, score=1.0 - i / 10, rank=i + 1, metric="gain_vs_fedavg") for i, p in enumerate(ranked)]
    ).to_csv(sweep / "ranking.csv", index=False)
    parts = [dict(param=f"blocks.{b}.attn.qkv.weight", part="attn", block=b) for b in range(2)]  # vit-nano: 2
    pd.DataFrame(parts).to_csv(sweep / "cells" / "s0-none" / "parts.csv", index=False)
    out = tmp_path / "run"
    args = ["train", *TINY, "--method", "fedperfix", "--from", str(sweep), "--top-blocks", "1", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    placement = json.loads((out / "placement.json").read_text())
    assert placement["blocks"] == [1] and placement["local"] == "embed" and "embed ranked above" in placement["why"]
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["method_options"]["blocks"] == "1" and config["method_options"]["local"] == "embed"
