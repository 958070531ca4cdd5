"""Does a grid's answer mean anything? The FedAvg reference judged against chance and against its own curve.

A gain over FedAvg is only a gain if FedAvg learned: a reference stuck at chance makes every part that
can memorise a client's majority class look "sensitive". So a sweep (and a comparison) trains its
first seed's FedAvg reference before the grid and judges it here:

- chance is the best accuracy reachable without looking at the images: 1 / classes, or for a model
  that shares everything (FedAvg) the one class that best fits all clients' test sets, or for a
  model that keeps anything local (a local bias is enough) each client's own majority-class rate;
- a run *learned* when its final mean client accuracy beats chance by LEARN_MARGIN, or by a tenth of
  the way from chance to 1, whichever is larger;
- its curve is *still climbing* when the slope over the last 20 % of evaluated rounds, carried over
  one more such window, would add more than FLAT_GAIN.

The judging functions are pure (tables in, numbers out); `check_reference` trains and decides, and
`calibrate` searches for the cheapest rounds x local epochs at which the reference learns and flattens.
"""

from __future__ import annotations

import math
import shutil
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from fedsens.personalize import partition as partition_lib
from fedsens.personalize import runio
from fedsens.personalize.config import RunConfig
from fedsens.personalize.engine.context import load_dataset
from fedsens.personalize.errors import UserError
from fedsens.sensitivity import executors, runs

LEARN_MARGIN = 0.05  # absolute accuracy above chance that counts as learning
LEARN_SHARE = 0.10  # ... or this share of the distance from chance to perfect, whichever is larger
FLAT_GAIN = 0.02  # a curve whose end slope would add more than this over one more tail window is climbing
TAIL = 0.2  # the end of a curve: this share of its evaluated rounds (at least 3 points)
REFERENCE_FILE = "reference_check.json"


class ReferenceDidNotLearn(UserError):
    """The FedAvg reference ended at chance: every gain over it would be noise (the CLI exits 2)."""


# ---- pure judging ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChanceLevels:
    """Accuracy without looking at the images, as a mean over clients (as acc_mean is)."""

    uniform: float  # 1 / classes
    shared_majority: float  # the one class that best fits every client's test set
    own_majority: float  # each client's own majority-class rate

    def for_model(self, shares_everything: bool) -> float:
        return max(self.uniform, self.shared_majority if shares_everything else self.own_majority)


def chance_levels(test_labels: list[np.ndarray], num_classes: int) -> ChanceLevels:
    """Chance levels from each client's test labels (clients with no test sample are left out)."""
    shares = np.array(
        [np.bincount(labels, minlength=num_classes) / len(labels) for labels in test_labels if len(labels)]
    )
    if not len(shares):
        return ChanceLevels(1 / num_classes, math.nan, math.nan)
    return ChanceLevels(1 / num_classes, float(shares.mean(axis=0).max()), float(shares.max(axis=1).mean()))


def learned_threshold(chance: float) -> float:
    """The accuracy a run must reach to count as having learned."""
    return chance + max(LEARN_MARGIN, LEARN_SHARE * (1 - chance))


def _evaluated(rounds: pd.DataFrame) -> pd.DataFrame:
    if not len(rounds) or "acc_mean" not in rounds:
        return pd.DataFrame(columns=["round", "acc_mean"])
    return rounds.dropna(subset=["acc_mean"])[["round", "acc_mean"]]


def _tail_slopes(rounds: pd.DataFrame, tail: float = TAIL) -> tuple[float, float, float]:
    """(slope of the last window, slope of the window before it, window length in rounds); NaN when too short."""
    points = _evaluated(rounds)
    size = min(len(points), max(3, math.ceil(tail * len(points))))
    if size < 2:
        return math.nan, math.nan, math.nan
    last = points.iloc[-size:]
    slope = float(np.polyfit(last["round"], last["acc_mean"], 1)[0])
    span = float(last["round"].iloc[-1] - last["round"].iloc[0]) or 1.0
    before = points.iloc[-2 * size + 1 : -size + 1]  # shares one point with the last window
    previous = float(np.polyfit(before["round"], before["acc_mean"], 1)[0]) if len(before) >= 2 else math.nan
    return slope, previous, span


def end_slope(rounds: pd.DataFrame, tail: float = TAIL) -> float:
    """Mean client accuracy gained per round over the last `tail` of the evaluated rounds (least squares)."""
    return _tail_slopes(rounds, tail)[0]


def is_climbing(rounds: pd.DataFrame, tail: float = TAIL) -> bool:
    """Whether the end slope, carried over one more window of the same length, adds more than FLAT_GAIN."""
    slope, _, span = _tail_slopes(rounds, tail)
    return bool(np.isfinite(slope) and slope * span > FLAT_GAIN)


def more_rounds(rounds: pd.DataFrame, tail: float = TAIL) -> int | None:
    """Rounds the trend suggests until the curve flattens, if it is climbing.

    The slope of the last window against the one before gives a decay per window (a saturating
    curve); the curve counts as flat once one window adds less than FLAT_GAIN. A slope that is not
    decaying says nothing about where it ends: then as many rounds again as were run (None if flat).
    """
    slope, previous, span = _tail_slopes(rounds, tail)
    if not is_climbing(rounds, tail):
        return None
    done = int(_evaluated(rounds)["round"].iloc[-1])
    decay = slope / previous if np.isfinite(previous) and previous > 0 else math.nan
    if not 0 < decay < 1:
        return done
    windows = math.log(FLAT_GAIN / (slope * span)) / math.log(decay)
    return max(1, math.ceil(windows * span))


@dataclass(frozen=True)
class Verdict:
    """What the check measured on one run."""

    acc_mean: float
    chance: float
    levels: ChanceLevels
    slope_end: float
    learned: bool
    climbing: bool
    more_rounds: int | None
    rounds: int

    @property
    def acc_over_chance(self) -> float:
        return self.acc_mean - self.chance


def judge(rounds: pd.DataFrame, levels: ChanceLevels, *, shares_everything: bool = True) -> Verdict:
    """Judge a run from its rounds table and the chance levels of its partition."""
    points = _evaluated(rounds)
    acc = float(points["acc_mean"].iloc[-1]) if len(points) else math.nan
    chance = levels.for_model(shares_everything)
    return Verdict(
        acc_mean=acc,
        chance=chance,
        levels=levels,
        slope_end=end_slope(rounds),
        learned=bool(np.isfinite(acc) and acc >= learned_threshold(chance)),
        climbing=is_climbing(rounds),
        more_rounds=more_rounds(rounds),
        rounds=int(points["round"].iloc[-1]) if len(points) else 0,
    )


def did_not_learn_text(verdict: Verdict, config: RunConfig, *, where: str) -> str:
    """The paragraph that stops a grid whose reference stayed at chance."""
    levels = verdict.levels
    text = (
        f"The FedAvg reference ({where}) did not learn: after {verdict.rounds} rounds its mean client accuracy is "
        f"{verdict.acc_mean:.3f}, against a chance level of {verdict.chance:.3f} (1/{round(1 / levels.uniform)} "
        f"classes = {levels.uniform:.3f}; the one class that best fits every client's test set "
        f"{levels.shared_majority:.3f}; each client's own majority class {levels.own_majority:.3f}); it needed "
        f"{learned_threshold(verdict.chance):.3f} to count as learning. Every gain over it would measure which "
        "parts can memorise a client's majority class, not which parts are sensitive, so the grid was not run. "
        f"Raise the training: --rounds (now {config.rounds}), --local-epochs (now {config.local_epochs}), the "
        f"learning rate (now {config.lr:g}) or the model size (now {config.model}); `fedsens sweep --calibrate` "
        "searches rounds and local epochs for you. Pass --force to run the grid anyway."
    )
    return textwrap.fill(text, width=110)


def climbing_text(verdict: Verdict) -> str:
    return (
        f"warning: the FedAvg reference is still climbing at round {verdict.rounds} "
        f"({verdict.slope_end:+.4f} mean client accuracy per round over the last {TAIL:.0%} of rounds); the trend "
        f"suggests about {verdict.more_rounds} more rounds (--rounds {verdict.rounds + (verdict.more_rounds or 0)}) "
        "before it flattens, and gains measured before then may change."
    )


# ---- reading a run folder ------------------------------------------------------------------------


def client_test_labels(folder: Path, cache: dict | None = None) -> tuple[list[np.ndarray], int]:
    """Each client's test labels and the number of classes, from a run folder's config and partition. The
    dataset is loaded as the run loaded it: with its data options (a synthetic population's classes, a saved
    dataset's columns) and at its decode size, so a decoded-image cache the run wrote is read, not rebuilt."""
    config = RunConfig(**RunConfig.upgrade_saved(runio.read_json(folder / "config.json")["config"]))
    key = (config.dataset, config.data_root, tuple(sorted(config.data_options.items())))
    cache = {} if cache is None else cache
    if key not in cache:
        dataset = load_dataset(config)
        cache[key] = (dataset.labels.numpy(), dataset.num_classes)
    labels, num_classes = cache[key]
    partition = partition_lib.load(folder / "partition.json")
    return [labels[index] for index in partition.test], num_classes


def judge_folder(
    folder: Path, *, shares_everything: bool, cache: dict | None = None, upto: int | None = None
) -> Verdict:
    """Judge the run in `folder`; `upto`: as if it had stopped after that round (a run is seeded and resumes
    exactly, so the first rounds of a longer run are the shorter run)."""
    test_labels, num_classes = client_test_labels(folder, cache)
    return judge(
        _rounds_upto(folder, upto),
        chance_levels(test_labels, num_classes),
        shares_everything=shares_everything,
    )


def _rounds_upto(folder: Path, upto: int | None) -> pd.DataFrame:
    rounds = runs.read_csv(folder / "rounds.csv")
    return rounds if upto is None or not len(rounds) else rounds[rounds["round"] <= upto].reset_index(drop=True)


def _rounds_held(folder: Path) -> int:
    """Rounds a run folder already holds (0: none)."""
    rounds = runs.read_csv(folder / "rounds.csv") if (folder / "rounds.csv").exists() else pd.DataFrame()
    return int(rounds["round"].max()) if len(rounds) else 0


def sanity_columns(table: pd.DataFrame, cells_dir: Path) -> pd.DataFrame:
    """The sensitivity table with SANITY_COLUMNS: each cell judged on its own curve, and trustworthy only
    when it finished, learned, and the FedAvg cell of its partition and seed learned too."""
    cache: dict = {}
    judged = []
    for _, row in table.iterrows():
        folder = cells_dir / str(row["cell"])
        if row["status"] != "done":
            judged.append(dict(chance=math.nan, acc_over_chance=math.nan, slope_end=math.nan, learned=False))
            continue
        verdict = judge_folder(folder, shares_everything=row["local_part"] == "none", cache=cache)
        judged.append(
            dict(
                chance=verdict.chance,
                acc_over_chance=verdict.acc_over_chance,
                slope_end=verdict.slope_end,
                learned=verdict.learned,
            )
        )
    frame = pd.DataFrame(judged, index=table.index)
    keys = ["dataset", "scheme", "alpha", "seed"]
    reference = table[keys].assign(learned=frame["learned"])[table["local_part"] == "none"]
    paired = table[keys].merge(reference, on=keys, how="left")["learned"].fillna(False).to_numpy(dtype=bool)
    out = table.copy()
    for column in ("chance", "acc_over_chance", "slope_end"):
        out[column] = frame[column]
    out["trustworthy"] = frame["learned"].to_numpy(dtype=bool) & paired
    return out


def ranking_trust(block: pd.DataFrame, table: pd.DataFrame) -> pd.Series:
    """A ranking block's `trustworthy`: every finished cell of the part is trustworthy (the accuracy block)
    or every FedAvg cell is (a divergence block, measured in the FedAvg cells); NA for tables without it."""
    if "trustworthy" not in table:
        return pd.Series(pd.NA, index=block.index, dtype="boolean")
    done = table[table["status"] == "done"]
    by_part = done.groupby("local_part")["trustworthy"].all()
    reference = bool(by_part.get("none", False))
    is_gain = block["metric"] == "gain_vs_fedavg"
    trusted = [bool(by_part.get(part, False)) if gain else reference for part, gain in zip(block["part"], is_gain)]
    return pd.Series(trusted, index=block.index, dtype="boolean")


# ---- the check before the grid ------------------------------------------------------------------


def _warn(text: str) -> None:
    tqdm.write(text, file=sys.stderr)  # a warning is not progress: shown even with --quiet


def check_reference(
    train: Callable[[tqdm], str], reference: RunConfig, out: Path, *, force: bool, where: str, quiet: bool = False
) -> Verdict | None:
    """Train the FedAvg reference (`train(bar)`, resumable: the grid then finds it finished), judge it, write
    `out/reference_check.json`, and stop with ReferenceDidNotLearn when it stayed at chance (unless `force`).
    A reference that failed is left to the grid, which records the failure."""
    with tqdm(total=reference.rounds, desc="reference check", unit="round", disable=quiet, dynamic_ncols=True) as bar:
        status = train(bar)
    if status == "failed":
        return None
    verdict = judge_folder(Path(reference.out), shares_everything=True)
    record = {**asdict(verdict), "where": where, "forced": force and not verdict.learned}
    runio.write_json(Path(out) / REFERENCE_FILE, record)
    if not verdict.learned:
        message = did_not_learn_text(verdict, reference, where=where)
        if not force:
            raise ReferenceDidNotLearn(message)
        _warn(f"warning (--force, the grid runs anyway): {message}")
    elif verdict.climbing:
        _warn(climbing_text(verdict))
    return verdict


def run_checked_grid(
    jobs: Sequence[executors.Job],
    reference: executors.Job | None,
    out: Path,
    *,
    executor: executors.ExecutorConfig | None,
    force: bool,
    fresh: bool,
    quiet: bool,
    desc: str,
    where: str = "",
) -> dict[str, str]:
    """A grid (sweep or comparison) whose FedAvg `reference` job trains and is judged first (check_reference),
    then every job where `executor` says; returns each job's outcome ('done', 'skipped', 'failed').

    `fresh` clears the jobs' folders once, here, so the reference the check trained is not cleared again, and
    the reference counts as trained (or failed) by this call, not as reused."""
    if fresh:
        for job in jobs:
            shutil.rmtree(job.config.out, ignore_errors=True)
    checked: dict[str, str] = {}
    if reference is not None:

        def train_reference(bar) -> str:
            checked["status"] = runs.run_resumable(reference.config, reference.hooks(), quiet=True)
            return checked["status"]

        check_reference(train_reference, reference.config, out, force=force, where=where or reference.name, quiet=quiet)
    status = executors.run_jobs(jobs, executor or executors.ExecutorConfig(), quiet=quiet, desc=desc)
    if reference is not None and checked.get("status") in ("done", "failed"):
        status[reference.name] = checked["status"]
    return status


# ---- calibration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    rounds: int
    local_epochs: int
    acc_mean: float
    chance: float
    slope_end: float
    learned: bool
    climbing: bool
    seconds: float

    @property
    def passes(self) -> bool:
        return self.learned and not self.climbing


@dataclass(frozen=True)
class Calibration:
    trials: tuple[Trial, ...]
    best: Trial | None
    seconds: float
    skipped: tuple[tuple[int, int], ...]  # (rounds, local_epochs) left out for the budget

    def options(self) -> str:
        return "" if self.best is None else f"--rounds {self.best.rounds} --local-epochs {self.best.local_epochs}"


def _cost(setting: tuple[int, int]) -> tuple[int, int]:
    return setting[0] * setting[1], setting[1]


def ladder(rounds: int, local_epochs: int, steps: int = 4) -> list[tuple[int, int]]:
    """(rounds, local epochs) from the given setting up, doubling each, cheapest (rounds x epochs) first."""
    grid = [(rounds * 2**i, local_epochs * 2**j) for i in range(steps) for j in range(3)]
    return sorted(grid, key=_cost)


def trend_step(rounds: int, epochs: int, verdict: Verdict) -> tuple[int, int] | None:
    """The setting the trend points to after a run that learned but is still climbing: its rounds plus the
    rounds the trend suggests (rounded up to a tenth of the rounds), when that is short of doubling them."""
    if not (verdict.learned and verdict.climbing and verdict.more_rounds):
        return None
    grain = max(1, rounds // 10)
    target = math.ceil((rounds + verdict.more_rounds) / grain) * grain
    return (target, epochs) if target < 2 * rounds else None


def calibrate(reference: RunConfig, out: Path, *, budget_minutes: float, quiet: bool = False) -> Calibration:
    """Train only the FedAvg reference up the ladder of rounds x local epochs within the time budget and
    return the cheapest setting at which it learns and its curve flattens. After a run that learned but is
    still climbing, the rounds its trend suggests come next (`trend_step`), when short of doubling them.

    One run folder per local-epochs setting (`out/calibrate/e<E>`): a longer setting continues the shorter
    one's checkpoint (the engine ends where an uninterrupted run would), so going up in rounds costs only
    the rounds added, and a calibration run again (a larger budget) judges what the folders hold from
    their first rounds. A setting predicted to overrun the budget (from the seconds per round x epoch so
    far) is skipped."""
    if budget_minutes <= 0:
        raise UserError(f"--budget-minutes must be > 0 (got {budget_minutes:g})")
    started = time.perf_counter()
    budget = budget_minutes * 60
    trials: list[Trial] = []
    skipped: list[tuple[int, int]] = []
    trained: dict[int, int] = {}  # local epochs -> rounds already in that folder
    per_round_epoch = math.nan
    queue = ladder(reference.rounds, reference.local_epochs)
    while queue:
        rounds, epochs = queue.pop(0)
        folder = Path(out) / "calibrate" / f"e{epochs}"
        held = trained.setdefault(epochs, _rounds_held(folder))
        extra = max(0, rounds - held) * epochs
        elapsed = time.perf_counter() - started
        if extra and np.isfinite(per_round_epoch) and elapsed + extra * per_round_epoch > budget:
            skipped.append((rounds, epochs))
            continue
        if not quiet:
            tqdm.write(f"calibrate: FedAvg, {rounds} rounds x {epochs} local epochs")
        if rounds > held:  # else the run in the folder already holds this setting as its first rounds
            wanted = reference.replace(rounds=rounds, local_epochs=epochs, personalize="none", out=str(folder))
            if runs.run_resumable(wanted, quiet=quiet) == "failed":
                raise UserError(f"the calibration run in {folder} failed (see its error.txt); lower the learning rate")
            trained[epochs] = rounds
        seconds = float(_rounds_upto(folder, rounds)["seconds"].sum())
        per_round_epoch = seconds / (rounds * epochs)
        verdict = judge_folder(folder, shares_everything=True, upto=rounds)
        trial = Trial(
            rounds,
            epochs,
            verdict.acc_mean,
            verdict.chance,
            verdict.slope_end,
            verdict.learned,
            verdict.climbing,
            seconds,
        )
        trials.append(trial)
        if trial.passes:
            break
        step = trend_step(rounds, epochs, verdict)
        if step is not None and step not in queue:
            queue = sorted([*queue, step], key=_cost)
    best = next((t for t in trials if t.passes), None)
    return Calibration(tuple(trials), best, time.perf_counter() - started, tuple(skipped))


def calibration_text(result: Calibration, reference: RunConfig) -> str:
    table = pd.DataFrame([asdict(t) for t in result.trials])
    lines = [
        f"FedAvg reference ({reference.dataset}, {reference.model}, {reference.clients} clients, "
        f"seed {reference.seed}) at increasing rounds x local epochs:",
        table.to_string(index=False, float_format=lambda v: f"{v:.4f}") if len(table) else "(nothing trained)",
    ]
    if result.best is not None:
        lines.append(
            f"\ncheapest setting at which FedAvg learns and its curve flattens: {result.options()}\n"
            f"pass it to the sweep: fedsens sweep {result.options()} ..."
        )
    else:
        left = (
            f"; left out for the budget: {', '.join(f'{r}x{e}' for r, e in result.skipped)}" if result.skipped else ""
        )
        lines.append(
            "\nno setting tried learned and flattened within the budget"
            f"{left}. Raise --budget-minutes, the learning rate or the model size."
        )
    lines.append(f"calibration took {result.seconds:.0f} s")
    return "\n".join(lines)


# ---- words for the ranking ---------------------------------------------------------------------


def trust_note(sensitivity: pd.DataFrame) -> str | None:
    """One partition's sensitivity rows -> what a reader must know before reading its ranking (None: nothing)."""
    if "trustworthy" not in sensitivity or not len(sensitivity):
        return None
    done = sensitivity[sensitivity["status"] == "done"]
    reference = done[done["local_part"] == "none"]
    untrusted_reference = reference[~reference["trustworthy"].astype(bool)]
    if len(reference) and len(untrusted_reference) == len(reference):
        levels = ", ".join(
            f"seed {row.seed}: {row.acc_mean:.3f} vs chance {row.chance:.3f}" for row in reference.itertuples()
        )
        return (
            f"the reference did not learn; no ranking (FedAvg mean client accuracy {levels}): the gains below are noise"
        )
    notes = []
    if len(untrusted_reference):
        seeds = ", ".join(str(s) for s in untrusted_reference["seed"])
        notes.append(f"the reference did not learn in seed(s) {seeds}; the gains of those seeds are noise")
    parts = done[(done["local_part"] != "none") & ~done["trustworthy"].astype(bool)]["local_part"].unique()
    if len(parts):
        notes.append(f"not trustworthy (a cell at chance or its reference at chance): {', '.join(map(str, parts))}")
    return "; ".join(notes) or None
