"""The cheap probe: one FedAvg run per seed, then a cheap per-part estimate of "keep this part local".

The sweep trains one federated run per part kept local; the probe asks the same question far more cheaply,
from the federated model of a finished FedAvg run, in one of the variants of sensitivity/probe_variants.py:
each part alone fine-tuned on each client (`finetune`, the default), the run forked for a few rounds with
the part kept local (`fork`), or the clients' gradient disagreement on the part (`disagreement`). Each
gives one score per client and part, paired per client across the parts.

The probe's order is claimed only when its parts are distinguishable (`distinguishable`: Friedman p < 0.05
and the top part's paired difference with the next excludes zero); otherwise the command prints no order.

With `sweep` set (`fedsens probe --from SWEEP`), the run settings are the sweep's, the sweep's finished
FedAvg cells are reused instead of trained again, and the probe's ranking is set against the sweep's
accuracy ranking (Spearman, beside the divergence metrics' `spearman_vs_gain`) and its cost against the
sweep's (the sum of the cells' round seconds).

Probe folder: probe.json (settings, cost, agreement), probe.csv (one row per seed, client and part) and
probe_ranking.csv (ranking.csv's columns for the probe's rows, metric `probe_gain`), plus
`fedavg-s<seed>/` when a FedAvg run had to be trained here.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from fedsens.personalize import runio
from fedsens.personalize.config import FREE_SETTINGS, RunConfig
from fedsens.personalize.errors import UserError
from fedsens.personalize.ranks import spearman
from fedsens.personalize.schema import GAIN, PROBE_COLUMNS, PROBE_METRIC, PROBE_RANKING_COLUMNS
from fedsens.sensitivity import probe_variants as variants
from fedsens.sensitivity import runs
from fedsens.sensitivity import stats as stats_lib
from fedsens.sensitivity.ranking import accuracy_order
from fedsens.sensitivity.sweep import Cell

PROBE_PARTS = ("embed", "attn", "mlp", "norm", "head")
SIGNIFICANCE = 0.05  # the probe prints an order only when Friedman's p is below this and its top part is resolved


@dataclass(frozen=True)
class ProbeConfig:
    """`run` holds the FedAvg run's settings (its personalize/method are set to plain FedAvg); one FedAvg
    run per seed, each reused from `sweep`'s cells when given and finished, else trained in `<out>`."""

    run: RunConfig = field(default_factory=RunConfig)
    seeds: tuple[int, ...] = (0,)
    parts: tuple[str, ...] = PROBE_PARTS
    variant: str = "finetune"
    probe_steps: int = 100  # measured: 100 steps predict the sweep better than 20 (docs/sweep.md)
    fork_rounds: int = 3
    sweep: str | None = None
    out: str = "runs/probe"
    fresh: bool = False
    quiet: bool = False

    def __post_init__(self):
        if self.variant not in variants.VARIANTS:
            raise UserError(f"--variant takes one of {', '.join(variants.VARIANTS)} (got {self.variant})")
        if self.fork_rounds < 1:
            raise UserError(f"--fork-rounds must be at least 1 (got {self.fork_rounds})")
        if self.probe_steps < 1:
            raise UserError(f"--probe-steps must be at least 1 (got {self.probe_steps})")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"--seeds {','.join(map(str, self.seeds))} must be one or more distinct seeds, e.g. 0")
        unknown = [p for p in self.parts if p not in PROBE_PARTS]
        if unknown or not self.parts:
            raise UserError(f"--parts takes some of {', '.join(PROBE_PARTS)} (got {', '.join(self.parts) or 'none'})")
        object.__setattr__(self, "run", self.run.replace(personalize="none", method="fedavg", method_options={}))


@dataclass(frozen=True)
class ProbeResult:
    out: Path
    probe: pd.DataFrame  # probe.csv
    ranking: pd.DataFrame  # probe_ranking.csv
    summary: dict  # probe.json


# ---- the sweep the probe is set against -------------------------------------------------------------


def sweep_settings(sweep_dir: str | Path) -> tuple[RunConfig, tuple[int, ...]]:
    """The run settings and seeds of the sweep in `sweep_dir` (sweep.json); settings an older sweep did not
    record keep RunConfig's defaults."""
    path = Path(sweep_dir) / "sweep.json"
    if not path.is_file():
        raise UserError(f"--from {sweep_dir} is not a sweep folder (no sweep.json); pass the --out of `fedsens sweep`")
    record = runio.read_json(path)
    known = {f.name for f in dataclasses.fields(RunConfig)}
    run = RunConfig(**{k: v for k, v in record["run"].items() if k in known})
    return run, tuple(int(s) for s in record.get("seeds", (run.seed,)))


def _fedavg_cell(config: ProbeConfig, wanted: RunConfig) -> Path | None:
    """The sweep's finished FedAvg cell with the same settings as `wanted` (settings the cell did not
    record count as the same), else None."""
    if config.sweep is None:
        return None
    cell = Cell(wanted.dataset, wanted.scheme, wanted.alpha, wanted.seed, "none")
    folder = Path(config.sweep) / "cells" / cell.name
    if not (folder / "checkpoint.pt").is_file() or not (folder / "config.json").is_file():
        return None
    saved = runio.read_json(folder / "config.json")["config"]
    same = all(saved[k] == v for k, v in dataclasses.asdict(wanted).items() if k not in FREE_SETTINGS and k in saved)
    summary = runio.read_json(folder / "summary.json") if (folder / "summary.json").is_file() else {}
    return folder if same and summary.get("status") == "done" and summary.get("rounds") == wanted.rounds else None


def fedavg_run(config: ProbeConfig, seed: int) -> tuple[Path, bool]:
    """The folder of the finished FedAvg run of `seed`, and whether it was reused from the sweep."""
    wanted = config.run.replace(seed=seed, out=str(Path(config.out) / f"fedavg-s{seed}"))
    reused = _fedavg_cell(config, wanted)
    if reused is not None:
        return reused, True
    if not config.fresh:
        runs.check_same_settings(Path(wanted.out), wanted)
    if runs.run_resumable(wanted, fresh=config.fresh, quiet=config.quiet) == "failed":
        raise UserError(f"the FedAvg run {wanted.out} failed (see its error.txt); fix it before probing")
    return Path(wanted.out), False


# ---- the probe itself --------------------------------------------------------------------------------


def probe_seed(config: ProbeConfig, seed: int, folder: Path, bar: tqdm | None = None) -> list[dict]:
    """probe.csv's rows of one seed: the variant's score of every client and part from the FedAvg run in
    `folder` (sensitivity/probe_variants.py)."""
    probe = variants.seed_probe(
        config.run.replace(seed=seed),
        folder,
        Path(config.out),
        variant=config.variant,
        parts=config.parts,
        steps=config.probe_steps,
        fork_rounds=config.fork_rounds,
    )
    return variants.ROWS[config.variant](probe, bar)


def client_bootstrap(
    values: np.ndarray, *, draws: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of the mean over clients (one seed: the clients are the only resampled unit)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(draws, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [50 * (1 - confidence), 100 - 50 * (1 - confidence)])
    return float(low), float(high)


def _interval(matrix: np.ndarray, confidence: float) -> tuple[float, float]:
    """The bootstrap interval of a seeds x clients array's mean: seeds then clients with two or more seeds,
    clients alone with one."""
    if matrix.shape[0] >= 2:
        return stats_lib.hierarchical_bootstrap(matrix, confidence=confidence)
    return client_bootstrap(matrix.ravel(), confidence=confidence)


def probe_ranking(probe: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """probe_ranking.csv: per part, the mean score over seeds and clients, its bootstrap interval, its rank
    (1 = the strongest case for keeping it local), Friedman's mean rank and p over the parts (blocks: seed x
    client), and against the next-ranked part the interval of their paired difference and whether it
    excludes zero (`resolved_vs_next`)."""
    gains = probe.rename(columns={"part": "local_part"})
    wide = stats_lib.blocks_by_parts(gains, list(dict.fromkeys(gains["local_part"])))
    friedman_p, mean_rank = stats_lib.friedman(wide)
    rows = []
    for part, part_rows in gains.groupby("local_part", sort=False):
        low, high = _interval(stats_lib.seed_client_matrix(gains, str(part)), confidence)
        rows.append(dict(part=part, score=float(part_rows["gain"].mean()), ci_low=low, ci_high=high))
    table = pd.DataFrame(rows)
    table["rank"] = table["score"].rank(ascending=False, method="first")
    table = table.sort_values("rank").reset_index(drop=True)
    order = list(table["part"])
    resolution = {}
    for upper, lower in zip(order, order[1:]):
        low, high = _interval(stats_lib.seed_client_difference(gains, upper, lower), confidence)
        resolution[upper] = (low, high, bool(low > 0 or high < 0) if np.isfinite(low) else False)
    table["diff_low"] = table["part"].map(lambda p: resolution.get(p, (math.nan,) * 3)[0])
    table["diff_high"] = table["part"].map(lambda p: resolution.get(p, (math.nan,) * 3)[1])
    table["resolved_vs_next"] = table["part"].map(lambda p: resolution[p][2] if p in resolution else None)
    table["metric"] = PROBE_METRIC
    table["spearman_vs_gain"] = math.nan
    table["mean_rank"] = table["part"].map(mean_rank)
    table["friedman_p"] = friedman_p
    first = probe.iloc[0]
    table["dataset"], table["scheme"], table["alpha"] = first["dataset"], first["scheme"], first["alpha"]
    return table.reindex(columns=PROBE_RANKING_COLUMNS)


def distinguishable(ranking: pd.DataFrame, alpha: float = SIGNIFICANCE) -> dict:
    """Whether the probe's parts differ at all (Friedman p < alpha) and its top part is resolved from the
    next (their paired difference's interval excludes zero): only then does its order mean something."""
    p = ranking["friedman_p"].dropna()
    friedman_p = float(p.iloc[0]) if len(p) else math.nan
    top = ranking.iloc[0] if len(ranking) else None
    top_resolved = top is not None and str(top["resolved_vs_next"]) == "True"
    reasons = []
    if not friedman_p < alpha:
        reasons.append(f"Friedman p = {friedman_p:.2g} >= {alpha:g}" if np.isfinite(friedman_p) else "no Friedman p")
    if not top_resolved:
        reasons.append(
            "its top part is not resolved from the next"
            + (
                f" ({top['part']} - {ranking.iloc[1]['part']}: [{top['diff_low']:+.4f}, {top['diff_high']:+.4f}])"
                if top is not None and len(ranking) > 1 and np.isfinite(top["diff_low"])
                else ""
            )
        )
    return dict(
        distinguishable=not reasons, friedman_p=friedman_p, top_resolved=top_resolved, why_not="; ".join(reasons)
    )


# ---- against the sweep -------------------------------------------------------------------------------


def sweep_agreement(sweep_dir: Path, ranking: pd.DataFrame) -> dict:
    """The probe's Spearman with the sweep's accuracy ranking, beside each divergence metric's, and the
    sweep's cost (the sum of its cells' round seconds)."""
    table = pd.read_csv(sweep_dir / "ranking.csv") if (sweep_dir / "ranking.csv").is_file() else None
    if table is None:
        raise UserError(f"--from {sweep_dir} has no ranking.csv; finish the sweep (`fedsens sweep --out {sweep_dir}`)")
    first = ranking.iloc[0]
    mine = table[(table["dataset"] == first["dataset"]) & (table["alpha"] == first["alpha"])]
    order = accuracy_order(mine)
    probe_score = ranking.set_index("part")["score"]
    divergence = mine[mine["metric"] != GAIN].groupby("metric", sort=False)["spearman_vs_gain"].first()
    rounds = runs.read_csv(sweep_dir / "rounds.csv")
    return dict(
        sweep=str(sweep_dir),
        sweep_order=list(map(str, order.index)),
        spearman_vs_sweep=spearman(probe_score, order),
        same_top_part=bool(len(order) and len(ranking) and str(ranking.iloc[0]["part"]) == str(order.index[0])),
        divergence_spearman={str(k): (None if pd.isna(v) else float(v)) for k, v in divergence.items()},
        sweep_seconds=float(rounds["seconds"].sum()) if "seconds" in rounds else math.nan,
    )


def run_probe(config: ProbeConfig) -> ProbeResult:
    """The FedAvg runs (reused or trained), the probe of every seed, then probe.csv, probe_ranking.csv and
    probe.json in `config.out`."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    folders, seed_fedavg_seconds, seed_probe_seconds, reused = {}, {}, {}, []
    for seed in config.seeds:
        folder, was_reused = fedavg_run(config, seed)
        folders[seed] = folder
        seed_fedavg_seconds[seed] = float(runio.read_json(folder / "summary.json").get("seconds", math.nan))
        if was_reused:
            reused.append(str(folder))
    rows: list[dict] = []
    per_seed = variants.progress_total(config.variant, config.run.clients, len(config.parts))
    bar = tqdm(total=len(config.seeds) * per_seed, desc=f"probe ({config.variant})", disable=config.quiet)
    for seed, folder in folders.items():
        started = time.perf_counter()
        rows.extend(probe_seed(config, seed, folder, bar))
        seed_probe_seconds[seed] = time.perf_counter() - started
    bar.close()
    fedavg_seconds, probe_seconds = sum(seed_fedavg_seconds.values()), sum(seed_probe_seconds.values())
    probe = runio.write_table(out / "probe.csv", rows, PROBE_COLUMNS)
    ranking = probe_ranking(probe)
    summary: dict = dict(
        variant=config.variant,
        seeds=list(config.seeds),
        parts=list(config.parts),
        probe_steps=config.probe_steps,
        fork_rounds=config.fork_rounds,
        probe_order=list(ranking["part"]),
        **distinguishable(ranking),
        fedavg_runs=[str(f) for f in folders.values()],
        fedavg_reused=reused,
        fedavg_seconds=round(fedavg_seconds, 2),
        probe_seconds=round(probe_seconds, 2),
        seed_seconds={
            str(s): dict(fedavg=round(seed_fedavg_seconds[s], 2), probe=round(seed_probe_seconds[s], 2))
            for s in folders
        },
        seconds=round(fedavg_seconds + probe_seconds, 2),
        run=dataclasses.asdict(config.run),
    )
    if config.sweep is not None:
        agreement = sweep_agreement(Path(config.sweep), ranking)
        ranking["spearman_vs_gain"] = agreement["spearman_vs_sweep"]
        sweep_seconds = agreement["sweep_seconds"]
        summary.update(
            agreement,
            cost_fraction=summary["seconds"] / sweep_seconds if sweep_seconds else math.nan,
            probe_only_fraction=probe_seconds / sweep_seconds if sweep_seconds else math.nan,
        )
    runio.write_table(out / "probe_ranking.csv", ranking.to_dict("records"), PROBE_RANKING_COLUMNS)
    runio.write_json(out / "probe.json", summary)
    return ProbeResult(out, probe, ranking, summary)
