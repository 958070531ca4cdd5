"""Would this sweep find it? A sweep's settings run on planted datasets whose answer is known.

`run_validate` takes the settings of a sweep (a preset, or the same options as `fedsens sweep`) and runs
them, unchanged but for the data, on the planted datasets (personalize/datasets/planted.py) at a few
strengths: each planted effect at each strength is one sweep, in `<out>/<effect>-<strength>/`. The data
are the planted base dataset split into domains, one domain per block of clients (the `domain` scheme) with
iid labels inside each domain (alpha IID_ALPHA), so the only difference between clients is the planted one;
recode trains without augmentation (a random shift moves the patch grid the recoding lives in). The FedAvg
reference check is passed over (a strong planted effect is meant to hurt FedAvg).

Per (effect, strength), validation.csv says which part the sweep ranks first, with its hierarchical-
bootstrap interval, whether its order against the next part is resolved at 95 %, and whether that is the
planted part (`found`: the planted part, resolved from the next and above zero; on the no-effect dataset,
`found` means that no part is resolved above zero). validation_summary.csv gives, per effect, the smallest
strength found: the minimal detectable effect of these settings. validation_metrics.csv says, per divergence
metric, whether its most sensitive part is the planted one: a metric that does not point at the planted part
cannot predict the sweep. validate.json records the validated settings, so that `fedsens sweep` shows the
validation of its own settings beside its ranking.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fedsens.personalize import model as model_lib
from fedsens.personalize import runio
from fedsens.personalize.datasets import planted, registry
from fedsens.personalize.errors import UserError
from fedsens.personalize.schema import (
    GAIN,
    VALIDATION_COLUMNS,
    VALIDATION_METRIC_COLUMNS,
    VALIDATION_SUMMARY_COLUMNS,
)
from fedsens.sensitivity import executors
from fedsens.sensitivity.sweep import SweepConfig, run_sweep

DEFAULT_STRENGTHS = (0.25, 0.5, 1.0)
IID_ALPHA = 1000.0  # Dirichlet alpha inside each domain: every client of a domain holds the same label mix
FOLDER = "validate"  # where `fedsens sweep` looks for the validation of its settings, inside its --out
# Settings a validation replaces (the data and the partition) or that do not change what a run computes.
NOT_VALIDATED = (
    "dataset",
    "data_root",
    "data_options",
    "scheme",
    "alpha",
    "personalize",
    "out",
    "device",
    "verify",
    "checkpoint_every",
    "client_store",
)


@dataclass(frozen=True)
class ValidateConfig:
    """`sweep`: the settings validated (its run settings, seeds and parts; `all` is left out, it is not
    ranked); each planted effect of `effects` runs at each of `strengths` (the no-effect dataset once)."""

    sweep: SweepConfig = field(default_factory=SweepConfig)
    effects: tuple[str, ...] = planted.EFFECTS
    strengths: tuple[float, ...] = DEFAULT_STRENGTHS
    base: str = "digits"
    domains: int = 4
    data_seed: int = 0
    out: str = f"runs/sweep/{FOLDER}"
    quiet: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "effects", tuple(dict.fromkeys(self.effects)))
        object.__setattr__(self, "strengths", tuple(sorted(set(float(s) for s in self.strengths))))
        unknown = [e for e in self.effects if e not in planted.EFFECTS]
        if unknown or not self.effects:
            raise UserError(
                f"--effects takes some of {', '.join(planted.EFFECTS)} (got {', '.join(unknown) or 'none'})"
            )
        if not self.strengths or not all(0 < s <= 1 for s in self.strengths):
            raise UserError(f"--strengths must be in (0, 1], the share of domains changed (got {self.strengths})")
        if self.sweep.run.clients < self.domains:
            raise UserError(
                f"--clients {self.sweep.run.clients} is fewer than the {self.domains} planted domains; "
                f"use at least {self.domains} clients (a multiple is best)"
            )
        planted.Options(base=self.base, domains=self.domains)  # bad planted options stop here

    def grid(self) -> list[tuple[str, float]]:
        """(effect, strength) pairs in run order; the no-effect dataset once, at strength 0."""
        return [
            (e, 0.0) if e == "none" else (e, s) for e in self.effects for s in (self.strengths if e != "none" else (0,))
        ]


def validated_settings(config: SweepConfig) -> dict[str, Any]:
    """What a validation of `config` stands for (JSON-ready): every run setting but the data and the
    partition, the seeds, and the ranked cells."""
    run = {k: v for k, v in dataclasses.asdict(config.run).items() if k not in NOT_VALIDATED}
    parts = [p for p in config.parts if p != "all"]
    return json.loads(json.dumps(dict(run=run, seeds=list(config.seeds), parts=parts)))


def folder_name(effect: str, strength: float) -> str:
    return "none" if effect == "none" else f"{effect}-{strength:g}"


def patch_size(config: ValidateConfig) -> int:
    """The model's patch size on the base data; recode needs the model to see the images at their own size."""
    run = config.sweep.run
    base = registry.load(config.base, run.data_root)
    spec = model_lib.input_spec(run.model, data_channels=base.channels, data_size=base.image_size)
    if "recode" in config.effects and spec.img_size != base.image_size:
        raise UserError(
            f"model {run.model} resizes {config.base}'s {base.image_size}-px images to {spec.img_size} px, so a "
            "within-patch pixel permutation is not one of the model's patches; choose a base the model keeps at "
            "its size (e.g. digits) or leave recode out (--effects concept,feature,none)"
        )
    return spec.patch_size


def planted_sweep(config: ValidateConfig, effect: str, strength: float, patch: int) -> SweepConfig:
    """The validated sweep's settings on one planted dataset."""
    options = planted.Options(
        base=config.base, effect=effect, strength=strength, domains=config.domains, patch=patch, seed=config.data_seed
    )
    changes: dict[str, Any] = dict(
        dataset="planted", data_options=dataclasses.asdict(options), scheme="domain", alpha=IID_ALPHA
    )
    if effect == "recode":
        changes.update(augment_shift=0.0, augment_scale=0.0)
    return dataclasses.replace(
        config.sweep,
        run=config.sweep.run.replace(**changes),
        parts=tuple(p for p in config.sweep.parts if p != "all"),
        datasets=(),
        schemes=(),
        alphas=(),
        out=str(Path(config.out) / folder_name(effect, strength)),
        quiet=config.quiet,
        force=True,  # a strong planted effect is meant to hurt FedAvg: the reference check would stop it
    )


# ---- judging one planted sweep (pure: tables in, rows out) ----------------------------------------


def _terms(part: str) -> set[str]:
    """The part types a cell's spec names (`attn,head` -> attn, head; `attn@3` -> attn)."""
    return {term.split("@")[0].strip() for term in str(part).split(",")}


def _is_true(value: Any) -> bool:
    """A flag as a table holds it: True / np.True_ / "True"; NaN (no next part) is not."""
    return str(value) == "True"


def outcome_row(effect: str, strength: float, ranking: pd.DataFrame, sensitivity: pd.DataFrame) -> dict[str, Any]:
    """validation.csv's row of one planted sweep, from its ranking.csv and sensitivity.csv."""
    expected = planted.EXPECTED_PARTS[effect]
    gain = ranking[(ranking["metric"] == GAIN) & ranking["rank"].notna()].sort_values("rank", kind="stable")
    above = gain[gain["boot_low"] > 0]["part"].astype(str).tolist()
    top = gain.iloc[0] if len(gain) else None
    resolved = top is not None and _is_true(top["resolved_vs_next"])
    if effect == "none":
        correct = found = not above
    else:
        correct = top is not None and bool(_terms(top["part"]) & set(expected))
        found = bool(correct and resolved and top is not None and top["boot_low"] > 0)
    fedavg = sensitivity[sensitivity["local_part"] == "none"]["acc_tail"]
    return dict(
        effect=effect,
        strength=strength,
        expected="|".join(expected),
        top_part=None if top is None else str(top["part"]),
        score=math.nan if top is None else float(top["score"]),
        boot_low=math.nan if top is None else float(top["boot_low"]),
        boot_high=math.nan if top is None else float(top["boot_high"]),
        resolved_vs_next=resolved,
        above_zero="|".join(above),
        correct=bool(correct),
        found=bool(found),
        fedavg_acc_tail=float(fedavg.mean()) if len(fedavg) else math.nan,
    )


def metric_rows(effect: str, strength: float, ranking: pd.DataFrame) -> list[dict[str, Any]]:
    """validation_metrics.csv's rows of one planted sweep: each divergence metric's most sensitive part."""
    expected = planted.EXPECTED_PARTS[effect]
    rows = []
    for metric, block in ranking[ranking["metric"] != GAIN].groupby("metric", sort=False):
        ranked = block.dropna(subset=["rank"]).sort_values("rank", kind="stable")
        top = str(ranked["part"].iloc[0]) if len(ranked) else None
        points = bool(_terms(top) & set(expected)) if expected and top is not None else None  # None: cannot say
        rows.append(
            dict(
                effect=effect,
                strength=strength,
                expected="|".join(expected),
                metric=metric,
                top_part=top,
                points_at_planted=points,
                spearman_vs_gain=float(block["spearman_vs_gain"].iloc[0]) if len(block) else math.nan,
            )
        )
    return rows


def summarize(validation: pd.DataFrame) -> pd.DataFrame:
    """validation_summary.csv: per effect, the outcome at its largest strength and the smallest strength found."""
    rows = []
    for effect, tried in validation.groupby("effect", sort=False):
        tried = tried.sort_values("strength")
        strongest = tried.iloc[-1]
        found = tried[tried["found"].astype(bool)]
        rows.append(
            dict(
                effect=effect,
                expected=strongest["expected"],
                strengths="|".join(f"{s:g}" for s in tried["strength"]),
                top_part=strongest["top_part"],
                resolved=bool(strongest["resolved_vs_next"]) if effect != "none" else bool(strongest["above_zero"]),
                found=bool(strongest["found"]),
                minimal_detectable=float(found["strength"].min()) if effect != "none" and len(found) else math.nan,
                seconds=float(tried["seconds"].sum()),
            )
        )
    return pd.DataFrame(rows, columns=VALIDATION_SUMMARY_COLUMNS)


# ---- running it -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidateResult:
    out: Path
    validation: pd.DataFrame
    metrics: pd.DataFrame
    summary: pd.DataFrame
    seconds: float


def run_validate(config: ValidateConfig, executor: executors.ExecutorConfig | None = None) -> ValidateResult:
    """One sweep per planted (effect, strength), resumable like any sweep; then the three tables and validate.json."""
    started = time.perf_counter()
    out = Path(config.out)
    patch = patch_size(config)
    rows, metric_table = [], []
    for effect, strength in config.grid():
        sweep_config = planted_sweep(config, effect, strength, patch)
        result = run_sweep(sweep_config, executor)
        row = outcome_row(effect, strength, result.ranking, result.sensitivity)
        cell_seconds = result.tables["rounds"]["seconds"].sum() if "seconds" in result.tables["rounds"] else math.nan
        rows.append(dict(row, seconds=float(cell_seconds), sweep=str(result.out)))
        metric_table.extend(metric_rows(effect, strength, result.ranking))
    validation = runio.write_table(out / "validation.csv", rows, VALIDATION_COLUMNS)
    metrics = runio.write_table(out / "validation_metrics.csv", metric_table, VALIDATION_METRIC_COLUMNS)
    summary = summarize(validation)
    runio.write_table(out / "validation_summary.csv", summary.to_dict("records"), VALIDATION_SUMMARY_COLUMNS)
    seconds = time.perf_counter() - started
    record = dict(
        settings=validated_settings(config.sweep),
        preset=config.sweep.preset,
        effects=list(config.effects),
        strengths=list(config.strengths),
        base=config.base,
        domains=config.domains,
        data_seed=config.data_seed,
        iid_alpha=IID_ALPHA,
        seconds=round(seconds, 2),
    )
    runio.write_json(out / "validate.json", record)
    return ValidateResult(out, validation, metrics, summary, seconds)


def validation_of(sweep: SweepConfig) -> Path | None:
    """The folder of a finished validation of `sweep`'s settings inside its --out, else None."""
    folder = Path(sweep.out) / FOLDER
    path = folder / "validate.json"
    if not path.is_file() or not (folder / "validation_summary.csv").is_file():
        return None
    return folder if runio.read_json(path).get("settings") == validated_settings(sweep) else None
