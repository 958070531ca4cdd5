"""`fedsens validate`: the judging of a planted sweep (pure, on constructed rankings), a short real run of the
command, the sweep printing the validation of its own settings, and the report's figures."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedsens.cli import app
from fedsens.personalize.errors import UserError
from fedsens.personalize.federation import RunConfig
from fedsens.personalize.schema import VALIDATION_COLUMNS, VALIDATION_METRIC_COLUMNS, VALIDATION_SUMMARY_COLUMNS
from fedsens.reports.report import build_report
from fedsens.reports.tables import read_folder
from fedsens.sensitivity import validate
from fedsens.sensitivity.sweep import SweepConfig


def _ranking(gains: dict[str, tuple[float, float, float]], resolved_top: bool, metric_tops: dict[str, str]):
    """A ranking.csv: the accuracy block (part -> score, boot_low, boot_high; best first) and one block per
    divergence metric naming its most sensitive part."""
    rows = []
    for rank, (part, (score, low, high)) in enumerate(gains.items(), start=1):
        rows.append(
            dict(
                part=part,
                score=score,
                rank=rank,
                metric="gain_vs_fedavg",
                boot_low=low,
                boot_high=high,
                resolved_vs_next=resolved_top if rank == 1 else False,
            )
        )
    for metric, top in metric_tops.items():
        for rank, part in enumerate([top, *(p for p in gains if p != top)], start=1):
            rows.append(dict(part=part, score=0.0, rank=rank, metric=metric, spearman_vs_gain=0.5))
    return pd.DataFrame(rows)


SENSITIVITY = pd.DataFrame(dict(local_part=["none", "none", "head"], acc_tail=[0.3, 0.5, 0.9]))


def test_a_planted_part_ranked_first_resolved_and_above_zero_is_found():
    ranking = _ranking({"head": (0.6, 0.5, 0.7), "mlp": (0.4, 0.3, 0.5)}, True, {"cka": "head", "rel_drift": "mlp"})
    row = validate.outcome_row("concept", 1.0, ranking, SENSITIVITY)
    assert (row["top_part"], row["correct"], row["resolved_vs_next"], row["found"]) == ("head", True, True, True)
    assert row["above_zero"] == "head|mlp" and row["fedavg_acc_tail"] == pytest.approx(0.4)
    metrics = {r["metric"]: r for r in validate.metric_rows("concept", 1.0, ranking)}
    assert metrics["cka"]["points_at_planted"] and not metrics["rel_drift"]["points_at_planted"]


def test_unresolved_wrong_or_spanning_zero_is_not_found():
    first_but_unresolved = _ranking({"embed": (0.05, -0.02, 0.1), "head": (0.02, -0.01, 0.05)}, False, {})
    row = validate.outcome_row("recode", 1.0, first_but_unresolved, SENSITIVITY)
    assert row["correct"] and not row["found"]  # the input re-coding at the quick settings
    wrong = _ranking({"attn": (0.3, 0.2, 0.4), "head": (0.1, 0.0, 0.2)}, True, {})
    assert not validate.outcome_row("concept", 1.0, wrong, SENSITIVITY)["correct"]
    either = _ranking({"norm": (0.3, 0.2, 0.4), "head": (0.1, 0.0, 0.2)}, True, {})
    assert validate.outcome_row("feature", 1.0, either, SENSITIVITY)["found"]  # embed or norm
    several = _ranking({"attn,head": (0.3, 0.2, 0.4), "mlp": (0.1, 0.0, 0.2)}, True, {})
    assert validate.outcome_row("concept", 1.0, several, SENSITIVITY)["correct"]


def test_no_effect_passes_only_when_nothing_is_resolved_above_zero():
    quiet = _ranking({"head": (0.01, -0.02, 0.04), "mlp": (0.0, -0.03, 0.03)}, False, {"cka": "head"})
    row = validate.outcome_row("none", 0.0, quiet, SENSITIVITY)
    assert row["found"] and row["expected"] == "" and row["above_zero"] == ""
    assert validate.metric_rows("none", 0.0, quiet)[0]["points_at_planted"] is None
    false_positive = _ranking({"head": (0.05, 0.01, 0.09), "mlp": (0.0, -0.03, 0.03)}, True, {})
    row = validate.outcome_row("none", 0.0, false_positive, SENSITIVITY)
    assert not row["found"] and row["above_zero"] == "head"


def test_the_minimal_detectable_strength_is_the_smallest_strength_found():
    validation = pd.DataFrame(
        [
            dict(effect="concept", strength=0.25, expected="head", top_part="mlp", found=False, resolved_vs_next=False),
            dict(effect="concept", strength=0.5, expected="head", top_part="head", found=True, resolved_vs_next=True),
            dict(effect="concept", strength=1.0, expected="head", top_part="head", found=True, resolved_vs_next=True),
            dict(
                effect="recode", strength=1.0, expected="embed", top_part="embed", found=False, resolved_vs_next=False
            ),
            dict(effect="none", strength=0.0, expected="", top_part="head", found=True, resolved_vs_next=False),
        ]
    ).assign(seconds=1.0, above_zero="")
    summary = validate.summarize(validation).set_index("effect")
    assert list(summary.reset_index().columns) == VALIDATION_SUMMARY_COLUMNS
    assert summary.loc["concept", "minimal_detectable"] == 0.5 and summary.loc["concept", "strengths"] == "0.25|0.5|1"
    assert math.isnan(summary.loc["recode", "minimal_detectable"]) and not summary.loc["recode", "found"]
    assert summary.loc["none", "found"] and summary.loc["concept", "seconds"] == 3.0


def test_bad_settings_are_one_line():
    with pytest.raises(UserError, match="--effects"):
        validate.ValidateConfig(effects=("rotate",))
    with pytest.raises(UserError, match="--strengths"):
        validate.ValidateConfig(strengths=(0.0,))
    with pytest.raises(UserError, match="fewer than the 4 planted domains"):
        validate.ValidateConfig(sweep=SweepConfig(run=RunConfig(clients=3)))
    config = validate.ValidateConfig(sweep=SweepConfig(run=RunConfig(model="vit_tiny_patch16_224")))
    with pytest.raises(UserError, match="resizes digits's 8-px images to 224 px"):
        validate.patch_size(config)


def test_a_planted_sweep_keeps_the_settings_and_changes_only_the_data():
    sweep = SweepConfig(run=RunConfig(rounds=7, lr=0.01), seeds=(3, 4), out="x")
    config = validate.ValidateConfig(sweep=sweep, strengths=(0.5, 1), out="v")
    assert config.grid() == [(e, s) for e in ("concept", "recode", "feature") for s in (0.5, 1.0)] + [("none", 0.0)]
    recode = validate.planted_sweep(config, "recode", 0.5, 4)
    assert (recode.run.rounds, recode.run.lr, recode.seeds, recode.force) == (7, 0.01, (3, 4), True)
    assert (recode.run.dataset, recode.run.scheme, recode.run.alpha) == ("planted", "domain", validate.IID_ALPHA)
    assert recode.run.data_options["effect"] == "recode" and recode.run.data_options["strength"] == 0.5
    assert (recode.run.augment_shift, recode.run.augment_scale) == (0.0, 0.0) and "all" not in recode.parts
    concept = validate.planted_sweep(config, "concept", 1.0, 4)
    assert concept.run.augment_shift == sweep.run.augment_shift and concept.out == "v/concept-1"
    assert validate.validated_settings(concept) == validate.validated_settings(sweep)  # recode: augmentation off
    assert validate.validated_settings(sweep) != validate.validated_settings(SweepConfig(seeds=(3,)))


TINY = ["--model", "vit-nano", "--clients", "4", "--rounds", "2", "--local-steps", "1", "--seeds", "0,1"]
TINY += ["--jobs", "1", "--quiet"]


def test_validate_runs_prints_and_writes_its_tables_and_the_sweep_shows_it(tmp_path):
    sweep_out = tmp_path / "sweep"
    args = ["validate", *TINY, "--effects", "concept,none", "--strengths", "1", "--div-every", "1"]
    args += ["--out", str(sweep_out / "validate")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Minimal detectable strength" in result.output and "concept  -> head" in result.output
    folder = sweep_out / "validate"
    validation = pd.read_csv(folder / "validation.csv")
    assert list(validation.columns) == VALIDATION_COLUMNS
    assert list(validation["effect"]) == ["concept", "none"] and list(validation["strength"]) == [1.0, 0.0]
    assert set(validation["top_part"]) <= {"embed", "attn", "mlp", "norm", "head"}
    metrics = pd.read_csv(folder / "validation_metrics.csv")
    assert list(metrics.columns) == VALIDATION_METRIC_COLUMNS and len(metrics) == 2 * 4  # 4 divergence metrics
    assert metrics["top_part"].notna().all() and metrics["points_at_planted"].isna().sum() == 4  # none: no part
    record = json.loads((folder / "validate.json").read_text())
    assert record["settings"]["seeds"] == [0, 1] and record["settings"]["run"]["rounds"] == 2
    cell = folder / "concept-1" / "cells"
    config = json.loads(next(cell.glob("*-s0-head/config.json")).read_text())["config"]
    assert config["dataset"] == "planted" and config["data_options"]["effect"] == "concept"

    report = build_report(folder, quiet=True)
    assert (report.parent / "validation.png").is_file() and (report.parent / "validation_metrics.png").is_file()
    assert "Planted effects at these settings" in report.read_text()

    sweep = CliRunner().invoke(app, ["sweep", *TINY, "--div-every", "1", "--force", "--out", str(sweep_out)])
    assert sweep.exit_code == 0, sweep.output
    assert "Would these settings find it?" in sweep.output
    tables = read_folder(sweep_out)
    assert {"validation", "validation_metrics", "validation_summary"} <= set(tables.frames)
    build_report(sweep_out, quiet=True)
    assert (sweep_out / "report" / "validation.png").is_file()
    # a validation of other settings (here: 2 rounds, not 1) is neither printed nor reported
    shutil.copytree(folder, tmp_path / "other" / "validate")
    other = CliRunner().invoke(
        app, ["sweep", *TINY, "--rounds", "1", "--div-every", "1", "--force", "--out", str(tmp_path / "other")]
    )
    assert other.exit_code == 0 and "Would these settings find it?" not in other.output
    assert "validation" not in read_folder(tmp_path / "other").frames
