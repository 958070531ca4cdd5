"""The reference check: a FedAvg reference that did not learn stops the sweep; the sanity columns; --calibrate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from fedsens.cli import app
from fedsens.personalize.config import RunConfig
from fedsens.personalize.errors import UserError
from fedsens.personalize.schema import SANITY_COLUMNS
from fedsens.reports.report import build_report
from fedsens.sensitivity import sanity
from fedsens.sensitivity.sweep import SweepConfig, run_sweep

OFFICEHOME_DOMAINS = ("Art", "Clipart", "Product", "Real World")


def write_digits_officehome(root: Path, *, size: int = 32, seed: int = 0) -> Path:
    """The 8x8 digits as an Office-Home folder tree: each image upsampled to `size` px RGB and given to one of
    the four domains at random, each domain with its own colours and contrast (feature skew across domains)."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    domain_of = rng.integers(0, len(OFFICEHOME_DOMAINS), size=len(digits.target))
    # (ink colour, paper colour, contrast): what a domain does to every one of its images
    looks = (
        ((120, 60, 20), (230, 210, 170), 0.5),  # Art: brown ink on cream paper, low contrast
        ((250, 250, 250), (20, 20, 120), 1.0),  # Clipart: white on dark blue (inverted)
        ((10, 10, 10), (255, 255, 255), 1.0),  # Product: black on white
        ((40, 110, 40), (150, 150, 150), 0.35),  # Real World: green on grey, washed out
    )
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        domain = int(domain_of[index])
        contrast = looks[domain][2]
        ink, paper = (np.asarray(c, dtype=float) for c in looks[domain][:2])
        strength = (image / 16.0 * contrast)[..., None]
        pixels = paper * (1 - strength) + ink * strength + rng.normal(0, 8, size=(8, 8, 3))
        picture = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        folder = root / OFFICEHOME_DOMAINS[domain] / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        picture.save(folder / f"{index:05d}.jpg", quality=90)
    return root


# ---- pure judging --------------------------------------------------------------------------------


def _rounds(acc: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"round": range(1, len(acc) + 1), "acc_mean": acc})


def test_chance_levels_uniform_shared_and_own_majority():
    test_labels = [np.array([0, 0, 0, 1]), np.array([1, 1, 2, 2]), np.array([], dtype=int)]
    levels = sanity.chance_levels(test_labels, num_classes=4)
    assert levels.uniform == 0.25
    assert levels.shared_majority == pytest.approx(0.375)  # class 0: (0.75 + 0) / 2, tied with class 1
    assert levels.own_majority == pytest.approx((0.75 + 0.5) / 2)
    assert levels.for_model(shares_everything=True) == 0.375 and levels.for_model(shares_everything=False) == 0.625


def test_judge_learned_flat_and_climbing():
    levels = sanity.ChanceLevels(0.1, 0.12, 0.3)
    at_chance = sanity.judge(_rounds([0.1] * 20), levels)
    assert not at_chance.learned and not at_chance.climbing and at_chance.more_rounds is None
    assert at_chance.acc_over_chance == pytest.approx(-0.02)
    # a saturating curve (1 - exp) cut off while still rising: climbing, and the trend names more rounds
    rising = [0.9 - 0.8 * np.exp(-r / 15) for r in range(1, 21)]
    climbing = sanity.judge(_rounds(rising), levels)
    assert climbing.learned and climbing.climbing and climbing.slope_end > 0
    assert 5 < climbing.more_rounds < 100
    flat = sanity.judge(_rounds([0.9 - 0.8 * np.exp(-r / 3) for r in range(1, 41)]), levels)
    assert flat.learned and not flat.climbing
    assert not sanity.judge(_rounds([0.1] * 19 + [0.2]), levels).learned  # 0.2 < chance 0.12 + 0.088


def test_ladder_goes_up_cheapest_first():
    steps = sanity.ladder(15, 2)
    assert steps[0] == (15, 2) and steps[1] == (30, 2) and (15, 4) in steps
    costs = [r * e for r, e in steps]
    assert costs == sorted(costs) and max(costs) == 15 * 8 * 2 * 4


# ---- the check on real (tiny) sweeps ------------------------------------------------------------


TINY = dict(dataset="synthetic", model="vit-nano", clients=2, join_ratio=1.0, device="cpu")


def _tiny_preset(run: RunConfig):
    return lambda name: SweepConfig(run=run, parts=("none", "head"), seeds=(0,), quiet=True)


def test_a_reference_that_cannot_learn_stops_the_sweep_and_force_marks_everything(tmp_path, monkeypatch):
    from fedsens.sensitivity import sweep as sweep_lib

    monkeypatch.setattr(sweep_lib, "preset", _tiny_preset(RunConfig(**TINY, rounds=1, lr=1e-7)))
    out = tmp_path / "sweep"
    stopped = CliRunner().invoke(app, ["sweep", "--out", str(out)])
    assert stopped.exit_code == 2
    assert "did not learn" in stopped.output and "--rounds (now 1)" in stopped.output and "--force" in stopped.output
    assert [p.name for p in (out / "cells").iterdir()] == ["synthetic-dirichlet-a0.3-s0-none"]  # no grid ran
    assert not sanity_record(out)["learned"]

    forced = CliRunner().invoke(app, ["sweep", "--out", str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert "the reference did not learn; no ranking" in forced.output and "untrusted" in forced.output
    table = pd.read_csv(out / "sensitivity.csv")
    assert set(SANITY_COLUMNS) <= set(table.columns) and not table["trustworthy"].any()
    assert table["chance"].between(0.1, 1).all()
    gains = pd.read_csv(out / "ranking.csv").query("metric == 'gain_vs_fedavg'")
    assert not gains["trustworthy"].any()
    html = build_report(out, quiet=True).read_text(encoding="utf-8")
    assert "The reference did not learn; no ranking" in html and "Most sensitive part" not in html


def test_a_reference_that_learns_passes_the_check(tmp_path):
    config = SweepConfig(
        run=RunConfig(**TINY, scheme="iid", rounds=3, local_epochs=2),
        parts=("none", "head"),
        seeds=(0,),
        out=str(tmp_path / "sweep"),
        quiet=True,
    )
    result = run_sweep(config)
    assert sanity_record(result.out)["learned"]
    assert result.sensitivity["trustworthy"].all()
    assert (result.sensitivity["acc_over_chance"] > 0.05).all()


def sanity_record(out: Path) -> dict:
    return json.loads((out / sanity.REFERENCE_FILE).read_text())


def test_calibrate_trains_only_the_reference_and_names_the_cheapest_passing_setting(tmp_path, monkeypatch):
    from fedsens.sensitivity import sweep as sweep_lib

    monkeypatch.setattr(sweep_lib, "preset", _tiny_preset(RunConfig(**TINY, scheme="iid", rounds=3, local_epochs=1)))
    out = tmp_path / "sweep"
    bad = CliRunner().invoke(app, ["sweep", "--out", str(out), "--calibrate", "--budget-minutes", "0"])
    assert bad.exit_code == 2 and "--budget-minutes must be > 0" in bad.output
    reference = sweep_lib.cell_config(sweep_lib.preset("quick"), sweep_lib.grid(sweep_lib.preset("quick"))[0])
    found = sanity.calibrate(reference.replace(out=str(out)), out, budget_minutes=2, quiet=True)
    assert not (out / "cells").exists() and (out / "calibrate" / "e1").is_dir()
    assert (found.trials[0].rounds, found.trials[0].local_epochs) == (3, 1)
    assert all(not trial.passes for trial in found.trials[:-1])  # it stops at the first setting that passes
    if found.best is not None:
        assert found.best == found.trials[-1]
        text = sanity.calibration_text(found, reference)
        assert f"fedsens sweep --rounds {found.best.rounds} --local-epochs {found.best.local_epochs}" in text


def test_calibrating_again_judges_each_setting_on_its_own_rounds_not_the_longer_run_in_the_folder(tmp_path):
    from fedsens.personalize.federation import run

    reference = RunConfig(**TINY, scheme="iid", rounds=3, local_epochs=1, out=str(tmp_path / "unused"))
    run(reference.replace(rounds=12, out=str(tmp_path / "calibrate" / "e1")), quiet=True)  # a longer run is there
    found = sanity.calibrate(reference, tmp_path, budget_minutes=5, quiet=True)
    alone = run(reference.replace(out=str(tmp_path / "three")), quiet=True)
    first = found.trials[0]
    assert (first.rounds, first.local_epochs) == (3, 1)
    assert first.acc_mean == pytest.approx(alone.rounds["acc_mean"].iloc[-1])  # round 3's, not round 12's
    assert first.seconds == pytest.approx(alone.rounds["seconds"].sum(), rel=1.0)  # 3 rounds' time, roughly


def test_a_run_asked_for_fewer_rounds_than_its_folder_holds_is_refused(tmp_path):
    from fedsens.personalize.federation import run

    config = RunConfig(**TINY, rounds=3, out=str(tmp_path))
    run(config, quiet=True)
    with pytest.raises(UserError, match="already holds 3 rounds, more than the 2 asked"):
        run(config.replace(rounds=2), resume=True, quiet=True)


def test_calibrate_follows_the_trend_of_a_climbing_run_before_doubling_it():
    levels = sanity.chance_levels([np.array([0, 1])], num_classes=2)

    def verdict(learned: bool, climbing: bool, more: int | None) -> sanity.Verdict:
        return sanity.Verdict(0.8, 0.5, levels, 0.001, learned, climbing, more, 240)

    assert sanity.trend_step(240, 2, verdict(True, True, 34)) == (288, 2)  # 274, up to a tenth of 240
    assert sanity.trend_step(240, 2, verdict(True, True, 300)) is None  # the doubling (480) comes first
    assert sanity.trend_step(240, 2, verdict(False, True, 34)) is None  # not learned: the trend means nothing
    assert sanity.trend_step(240, 2, verdict(True, False, None)) is None  # flat already
