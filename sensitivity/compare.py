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
from tqdm import tqdm

from fedsens.personalize import preflight, presets, runio, runlock
from fedsens.personalize.errors import UserError
from fedsens.personalize.federation import RunConfig
from fedsens.personalize.methods import METHODS, method_class, paper_labels, paper_methods, registry
from fedsens.personalize.schema import COMPARISON_COLUMNS, RUN_KEY_COLUMNS, SUMMARY_COLUMNS
from fedsens.sensitivity import executors, runs, sanity

PAPER_METHODS = paper_methods()  # each method class declares its row of the paper's table
PLACED_FEDPERFIX = "fedperfix-placed"  # compare --from SWEEP: FedPerfix placed by the sweep's ranking
BUDGET_PLACED = "budget-placed"  # compare --from SWEEP --budget N: FedAvg keeping the sweep's budgeted cells local


@dataclass(frozen=True)
class CompareConfig:
    """`run` holds the settings every run shares; `method_options` (KEY -> value) go to every compared
    method that has that option; `method_overrides` changes the settings per method (e.g. Per-FedAvg's
    learning rate in the paper presets; a "method_options" entry there adds options for that method
    only); each run lands in `<out>/runs/<method>-s<seed>`. `variants` adds runs of a method under another
    row name, name -> {"method": ..., "method_options": {...}, optionally "personalize": SPEC} (the sweep-placed
    FedPerfix of `compare --from SWEEP`: row "fedperfix-placed"; the budgeted cells of `--budget`: row
    "budget-placed"); they run after the methods, within each seed."""

    run: RunConfig = field(default_factory=RunConfig)
    methods: tuple[str, ...] = PAPER_METHODS
    seeds: tuple[int, ...] = (0,)
    method_options: Mapping[str, Any] = field(default_factory=dict)
    method_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    out: str = "runs/compare"
    fresh: bool = False
    quiet: bool = False
    force: bool = False  # run the methods even when the FedAvg reference did not learn
    preset: str | None = None  # the personalize.presets name it started from (protocol.json, paper rows)
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

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
        known = {key for cls in METHODS.values() for key in registry.option_fields(cls)}
        for key in self.method_options:
            if key not in known:
                raise UserError(f"no method has an option {key!r}; `fedsens methods` lists each method's options")
        for name, variant in self.variants.items():
            if name in METHODS or variant.get("method") not in METHODS:
                raise UserError(f"variant {name!r} must have a name no method has and name a method it runs")
        for method in self.methods:  # a value of the wrong type is an error before anything trains
            registry.resolve_options(method_class(method), options_for(self, method))
        for name in self.variants:
            registry.resolve_options(method_class(method_of(self, name)), options_for(self, name))


def measured_gain(comparison: pd.DataFrame, name: str, reference: str = "fedavg") -> float:
    """The row `name`'s final mean client accuracy minus the reference's, paired by seed, mean over seeds."""
    done = comparison[comparison["status"] == "done"].pivot_table(index="seed", columns="method", values="acc_mean")
    if name not in done or reference not in done:
        return float("nan")
    return float((done[name] - done[reference]).mean())


def method_of(config: CompareConfig, name: str) -> str:
    """The method a row runs: itself, or the method of a variant."""
    return str(config.variants[name]["method"]) if name in config.variants else name


def row_names(config: CompareConfig) -> tuple[str, ...]:
    """comparison.csv's method names in run order: the methods, then the variants."""
    return (*config.methods, *config.variants)


def options_for(config: CompareConfig, name: str) -> dict[str, Any]:
    """The shared options this method has, then its own from `method_overrides`, then a variant's own."""
    method = method_of(config, name)
    fields = registry.option_fields(method_class(method))
    shared = {k: v for k, v in config.method_options.items() if k in fields}
    variant = config.variants.get(name, {}).get("method_options", {})
    return {**shared, **config.method_overrides.get(method, {}).get("method_options", {}), **variant}


def check_options_apply(methods: tuple[str, ...], keys: list[str]) -> None:
    """Every option the user gave must belong to at least one compared method."""
    for key in keys:
        having = [m for m in methods if key in registry.option_fields(method_class(m))]
        if not having:
            owners = [name for name, cls in METHODS.items() if key in registry.option_fields(cls)]
            raise UserError(
                f"-o {key} belongs to none of the compared methods ({', '.join(methods)})"
                + (f"; it is an option of {', '.join(owners)}" if owners else "; `fedsens methods` lists the options")
            )


def run_config(config: CompareConfig, name: str, seed: int) -> RunConfig:
    """One run: the shared settings, then the method's overrides and options, then its seed and folder."""
    method = method_of(config, name)
    changes = {k: v for k, v in config.method_overrides.get(method, {}).items() if k != "method_options"}
    if "personalize" in config.variants.get(name, {}):  # a variant that keeps its own parts (budget-placed)
        changes["personalize"] = config.variants[name]["personalize"]
    out = Path(config.out) / "runs" / f"{name}-s{seed}"
    options = options_for(config, name)
    return config.run.replace(**changes, method=method, method_options=options, seed=seed, out=str(out))


def preset(name: str) -> CompareConfig:
    """A named protocol (personalize.presets) as a comparison; the CLI lays every option it was given
    over it. default: the embedded default, 20 rounds, all eleven methods, one seed; paper-*: the
    paper's settings (GPU-sized), Per-FedAvg at its own lr 0.001, seed 1."""
    chosen = presets.get(name)
    return CompareConfig(
        run=chosen.run_config(),
        preset=name,
        method_options=chosen.method_options,
        method_overrides=chosen.method_overrides,
        **chosen.compare,
    )


def protocol(config: CompareConfig) -> dict:
    """The protocol every run follows, the per-method changes, and the paper rows (paper presets)."""
    record = presets.protocol(config.run, preset=config.preset, method_overrides=config.method_overrides)
    record.update(methods=list(config.methods), seeds=list(config.seeds))
    if config.variants:
        record["variants"] = {name: dict(variant) for name, variant in config.variants.items()}
    rows = paper_rows(config)
    if rows:
        record["paper_rows"] = rows
    return record


def paper_rows(config: CompareConfig) -> dict[str, str]:
    """Our method -> the paper's table row it reproduces, under a paper preset (else empty)."""
    if not (config.preset or "").startswith("paper-"):
        return {}
    labels = paper_labels()  # the public code's "FedRep" preset keeps the head local as our fedper does
    return {m: labels.get(m, "-") for m in config.methods}


def _preset_note(config: CompareConfig, message: str) -> str:
    """Where a bad value in `message` came from when the preset set it for one method (its FedPerfix local
    parts, say), and the option that overrides it; '' otherwise."""
    for method, changes in config.method_overrides.items():
        for key, value in changes.get("method_options", {}).items():
            if any(f"'{term.strip()}'" in message for term in str(value).split(",") if term.strip()):
                return (
                    f" ({key}={value} is the {config.preset or 'preset'} preset's setting for {method}; "
                    f"override it with -o {key}=...)"
                )
    return ""


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
        protocol=summary.get("protocol", "after-aggregation"),
    )
    return row


def _mean_sd(mean: float, sd: float, seeds: int) -> str:
    """'81.20 ± 1.35' over several seeds; one seed has no spread to show."""
    return "-" if seeds == 0 else f"{mean:.2f}" if seeds == 1 else f"{mean:.2f} ± {sd:.2f}"


def summarize(comparison: pd.DataFrame, dataset: str, rows_of_paper: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per method in run order: final and best-round accuracy (%) mean ± sd over seeds, the costs,
    the evaluation protocol and (under a paper preset) the paper row each method reproduces."""
    rows = []
    for method, method_runs in comparison.groupby("method", sort=False):
        done = method_runs[method_runs["status"] == "done"]
        mean, sd = 100 * done["acc_mean"].mean(), 100 * (done["acc_mean"].std(ddof=1) if len(done) > 1 else 0.0)
        best_sd = 100 * (done["acc_best"].std(ddof=1) if len(done) > 1 else 0.0)
        protocols = sorted(set(done["protocol"].dropna())) if "protocol" in done else []
        rows.append(
            dict(
                method=method,
                dataset=dataset,
                accuracy=_mean_sd(mean, sd, len(done)),
                acc_mean=mean,
                acc_sd=sd,
                accuracy_best=_mean_sd(100 * done["acc_best"].mean(), best_sd, len(done)),
                acc_best=100 * done["acc_best"].mean(),
                client_std=100 * done["acc_std"].mean(),
                local_params=done["local_params"].max(),
                comm_mb_per_round=done["comm_bytes_per_round"].mean() / 1e6,
                seconds_per_round=done["seconds_per_round"].mean(),
                seeds=len(done),
                failed=len(method_runs) - len(done),
                protocol=",".join(protocols),
                paper_row=(rows_of_paper or {}).get(str(method), ""),
            )
        )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _concatenated(config: CompareConfig, table: str) -> pd.DataFrame:
    folders = [
        (dict(method=method, seed=seed), Path(run_config(config, method, seed).out))
        for seed in config.seeds
        for method in row_names(config)
    ]
    return runs.concatenated(folders, table, RUN_KEY_COLUMNS)


def _check_same_partition(config: CompareConfig) -> None:
    """Within a seed every method must have trained on one partition, or the table compares data."""
    for seed in config.seeds:
        hashes = {}
        for method in row_names(config):
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
        [_row(config, m, s) for s in config.seeds for m in row_names(config)], columns=COMPARISON_COLUMNS
    )
    tables = {
        "comparison": comparison,
        "summary": summarize(comparison, config.run.dataset, paper_rows(config)),
        "rounds": _concatenated(config, "rounds"),
        "metrics": _concatenated(config, "metrics"),
    }
    for name, frame in tables.items():
        runio.write_table(out / f"{name}.csv", frame.to_dict("records"), list(frame.columns))
    return tables


def run_compare(config: CompareConfig, executor: executors.ExecutorConfig | None = None) -> CompareResult:
    """Run every method x seed not yet finished (in this process, or where `executor` says), then write
    the comparison's tables. The comparison folder is locked meanwhile: a second compare on it is refused."""
    with runlock.hold(runlock.folder(config.out), what="compare", notify=tqdm.write):
        return _run_compare_locked(config, executor)


def _run_compare_locked(config: CompareConfig, executor: executors.ExecutorConfig | None) -> CompareResult:
    started = time.perf_counter()
    out = Path(config.out)
    todo = [(m, s) for s in config.seeds for m in row_names(config)]
    try:
        preflight.check(run_config(config, m, s) for m, s in todo)  # bad input stops here, before any run
    except UserError as err:
        raise UserError(f"{err}{_preset_note(config, str(err))}") from None
    presets.write_protocol(out, protocol(config))
    if not config.fresh:
        for method, seed in todo:
            wanted = run_config(config, method, seed)
            runs.check_same_settings(Path(wanted.out), wanted)
    runio.write_json(out / "compare.json", dataclasses.asdict(config))
    jobs = [run_job(config, method, seed) for method, seed in todo]
    # the reference check: FedAvg of the first seed, judged before the others run
    reference = run_job(config, "fedavg", config.seeds[0]) if "fedavg" in config.methods else None
    status = sanity.run_checked_grid(
        jobs,
        reference,
        out,
        executor=executor,
        force=config.force,
        fresh=config.fresh,
        quiet=config.quiet,
        desc="compare",
        where=f"run fedavg-s{config.seeds[0]}",
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
