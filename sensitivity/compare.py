"""The method comparison: methods x seeds on one dataset and partition, one federated run each.

Within a seed every method gets the same partition and the same initial weights (both follow the
run's seed; the partitions' hashes are checked), so differences in the table are the methods'.
Runs are resumable: a finished run (summary.json with status "done" and the rounds asked for) is
skipped, a half-done one continues from its checkpoint, and one that fails (an exception, a NaN
loss) leaves `error.txt` and a "failed" row while the others go on.

Comparison folder: compare.json, runs/<method>-s<seed>/ (run folders), comparison.csv (one row per
run), summary.csv (one row per method, mean ± std over seeds: the shape of the paper's main
table), and the runs' rounds.csv / metrics.csv concatenated with leading columns `method, seed`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fedsens.personalize import runio
from fedsens.personalize.errors import UserError
from fedsens.personalize.federation import RunConfig
from fedsens.personalize.methods import METHODS
from fedsens.sensitivity import executors, runs

PAPER_METHODS = (
    "fedavg",
    "local",
    "fedbn",
    "fedper",
    "fedrep",
    "fedbabu",
    "apfl",
    "perfedavg",
    "vanilla-attention",
    "vanilla-prefix",
    "fedperfix",
)
COMPARISON_COLUMNS = [
    "method",
    "seed",
    "acc_mean",
    "acc_std",
    "acc_p10",
    "local_params",
    "comm_bytes_per_round",
    "seconds",
    "seconds_per_round",
    "acc_best",
    "round_best",
    "rounds",
    "status",
]
SUMMARY_COLUMNS = [
    "method",
    "dataset",
    "accuracy",
    "acc_mean",
    "acc_sd",
    "acc_best",
    "client_std",
    "local_params",
    "comm_mb_per_round",
    "seconds_per_round",
    "seeds",
    "failed",
]


@dataclass(frozen=True)
class CompareConfig:
    """`run` holds the settings every run shares; `method_overrides` changes them per method (e.g.
    Per-FedAvg's learning rate in the paper presets); each run lands in `<out>/runs/<method>-s<seed>`."""

    run: RunConfig = field(default_factory=RunConfig)
    methods: tuple[str, ...] = PAPER_METHODS
    seeds: tuple[int, ...] = (0,)
    method_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    out: str = "runs/compare"
    fresh: bool = False
    quiet: bool = False

    def __post_init__(self):
        if not self.methods:
            raise UserError("--methods is empty; name at least one, e.g. fedavg,fedperfix")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise UserError(f"unknown method {unknown[0]!r} in --methods; choose from {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise UserError(f"--methods {','.join(self.methods)} names a method twice; name each once")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"--seeds {','.join(map(str, self.seeds))} must be one or more distinct seeds, e.g. 0,1,2")
        if self.run.personalize != "none":
            raise UserError("every compared method fixes its own local parts; leave --personalize out")
        fields = {f.name for f in dataclasses.fields(RunConfig)}
        for method, changes in self.method_overrides.items():
            bad = sorted(set(changes) - fields)
            if bad:
                raise UserError(f"override {bad[0]!r} for {method} is not a RunConfig field")


def run_config(config: CompareConfig, method: str, seed: int) -> RunConfig:
    """One run: the shared settings, then the method's overrides, then the method, seed and folder."""
    changes = dict(config.method_overrides.get(method, {}))
    out = Path(config.out) / "runs" / f"{method}-s{seed}"
    return config.run.replace(**changes, method=method, seed=seed, out=str(out))


def _paper(dataset: str, **changes: Any) -> CompareConfig:
    """The public code's protocol (FEDPERFIX.md): ViT-S/16 from scratch at 224 px, 64 clients, 8 a
    round, 50 rounds, 10 local epochs, batch 64, plain SGD at lr 0.01 (Per-FedAvg: 0.001, and beta
    = lr as the code sets it), FedBABU fine-tuned for 1 step (the code's default), FedPerfix with
    mid_dim 256 and scale 1.5, no augmentation, seed 1."""
    run = RunConfig(
        dataset=dataset,
        model="vit_small_patch16_224",
        scheme="dirichlet",
        alpha=0.5,
        clients=64,
        join_ratio=0.125,
        rounds=50,
        local_epochs=10,
        batch_size=64,
        lr=0.01,
        momentum=0.0,
        augment_shift=0.0,
        augment_scale=0.0,
        finetune_steps=1,
        plugin_mid_dim=256,
        plugin_scale=1.5,
    )
    return CompareConfig(
        run=run.replace(**changes),
        seeds=(1,),
        out=f"runs/compare-{dataset}",
        method_overrides={"perfedavg": {"lr": 0.001}},
    )


def preset(name: str) -> CompareConfig:
    """A named starting point; the CLI lays every option it was given over it.

    default: the engine's tuned defaults on the embedded digits data (vit-micro, 20 clients, 10 a
    round) with 20 rounds and evaluation every 5; the FedPerfix adapter keeps the public code's
    width ratio (256 on a 384-wide ViT -> 64 on the 96-wide vit-micro); Per-FedAvg's beta is the lr
    (RunConfig's default), as the public code does. All eleven methods, one seed.
    paper-*: the paper's settings (GPU-sized). CIFAR-100 also keeps blocks.11 local for FedPerfix,
    as the public preset does; Office-Home has 16 clients (4 per domain, Dirichlet 1.0 inside each
    domain, 85/15 split) with the code's join ratio 0.125.
    """
    default_run = RunConfig(rounds=20, eval_every=5, plugin_mid_dim=64)
    presets = {
        "default": lambda: CompareConfig(run=default_run),
        "paper-cifar100": lambda: _paper("cifar100", fedperfix_local="blocks.11"),
        "paper-organamnist": lambda: _paper("organamnist"),
        "paper-officehome": lambda: _paper("officehome", scheme="domain", alpha=1.0, clients=16, test_fraction=0.15),
    }
    if name not in presets:
        raise UserError(f"unknown compare preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]()


def run_job(config: CompareConfig, method: str, seed: int) -> executors.Job:
    """One method x seed as a job any executor can run."""
    return executors.Job(f"{method}-s{seed}", run_config(config, method, seed))


def _row(config: CompareConfig, method: str, seed: int) -> dict:
    """comparison.csv's row of one run: final-round accuracy over clients, best round, costs."""
    wanted = run_config(config, method, seed)
    folder = Path(wanted.out)
    row = {"method": method, "seed": seed, "status": runs.status(folder)}
    if row["status"] != "done":
        return row
    summary = runio.read_json(folder / "summary.json")
    final = runs.final_accuracy(runs.read_csv(folder / "rounds.csv"))
    row.update(
        acc_mean=final["acc_mean"],
        acc_std=final["acc_std"],
        acc_p10=final["acc_p10"],
        local_params=summary["local_params"],
        comm_bytes_per_round=summary["comm_bytes_per_round"],
        seconds=summary["seconds"],
        seconds_per_round=summary["seconds_per_round"],
        acc_best=summary["acc_best"],
        round_best=summary["round_best"],
        rounds=summary["rounds"],
    )
    return row


def _mean_sd(mean: float, sd: float, seeds: int) -> str:
    """'81.20 ± 1.35' over several seeds; one seed has no spread to show."""
    return "-" if seeds == 0 else f"{mean:.2f}" if seeds == 1 else f"{mean:.2f} ± {sd:.2f}"


def summarize(comparison: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """One row per method in run order: final accuracy (%) mean ± sd over seeds and the costs."""
    rows = []
    for method, method_runs in comparison.groupby("method", sort=False):
        done = method_runs[method_runs["status"] == "done"]
        mean, sd = 100 * done["acc_mean"].mean(), 100 * (done["acc_mean"].std(ddof=1) if len(done) > 1 else 0.0)
        rows.append(
            dict(
                method=method,
                dataset=dataset,
                accuracy=_mean_sd(mean, sd, len(done)),
                acc_mean=mean,
                acc_sd=sd,
                acc_best=100 * done["acc_best"].mean(),
                client_std=100 * done["acc_std"].mean(),
                local_params=done["local_params"].max(),
                comm_mb_per_round=done["comm_bytes_per_round"].mean() / 1e6,
                seconds_per_round=done["seconds_per_round"].mean(),
                seeds=len(done),
                failed=len(method_runs) - len(done),
            )
        )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _concatenated(config: CompareConfig, table: str) -> pd.DataFrame:
    folders = [
        (dict(method=method, seed=seed), Path(run_config(config, method, seed).out))
        for seed in config.seeds
        for method in config.methods
    ]
    return runs.concatenated(folders, table, ["method", "seed"])


def _check_same_partition(config: CompareConfig) -> None:
    """Within a seed every method must have trained on one partition, or the table compares data."""
    for seed in config.seeds:
        hashes = {}
        for method in config.methods:
            path = Path(run_config(config, method, seed).out) / "partition.json"
            if path.exists():
                hashes[method] = runio.read_json(path).get("hash")
        if len(set(hashes.values())) > 1:
            raise UserError(f"the seed-{seed} runs used different partitions ({hashes}); rerun with --fresh")


@dataclass(frozen=True)
class CompareResult:
    out: Path
    comparison: pd.DataFrame
    summary: pd.DataFrame
    ran: tuple[str, ...]
    skipped: tuple[str, ...]
    failed: tuple[str, ...]
    seconds: float


def write_tables(config: CompareConfig) -> dict[str, pd.DataFrame]:
    """comparison.csv, summary.csv and the concatenated rounds.csv / metrics.csv."""
    out = Path(config.out)
    comparison = pd.DataFrame(
        [_row(config, m, s) for s in config.seeds for m in config.methods], columns=COMPARISON_COLUMNS
    )
    tables = {
        "comparison": comparison,
        "summary": summarize(comparison, config.run.dataset),
        "rounds": _concatenated(config, "rounds"),
        "metrics": _concatenated(config, "metrics"),
    }
    for name, frame in tables.items():
        runio.write_table(out / f"{name}.csv", frame.to_dict("records"), list(frame.columns))
    return tables


def run_compare(config: CompareConfig, executor: executors.ExecutorConfig | None = None) -> CompareResult:
    """Run every method x seed not yet finished (in this process, or where `executor` says), then write
    the comparison's tables."""
    started = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [(m, s) for s in config.seeds for m in config.methods]
    if not config.fresh:
        for method, seed in todo:
            wanted = run_config(config, method, seed)
            runs.check_same_settings(Path(wanted.out), wanted)
    runio.write_json(out / "compare.json", dataclasses.asdict(config))
    jobs = [run_job(config, method, seed) for method, seed in todo]
    status = executors.run_jobs(
        jobs, executor or executors.ExecutorConfig(), fresh=config.fresh, quiet=config.quiet, desc="compare"
    )
    outcome: dict[str, list[str]] = {"done": [], "skipped": [], "failed": []}
    for job in jobs:
        outcome[status[job.name]].append(job.name)
    _check_same_partition(config)
    tables = write_tables(config)
    return CompareResult(
        out,
        tables["comparison"],
        tables["summary"],
        tuple(outcome["done"]),
        tuple(outcome["skipped"]),
        tuple(outcome["failed"]),
        time.perf_counter() - started,
    )
