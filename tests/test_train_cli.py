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
