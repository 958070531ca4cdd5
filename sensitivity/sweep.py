"""The sensitivity sweep: one federated run per (partition, seed, local part) cell, then the tables.

A sweep folder holds `sweep.json`, one run folder per cell under `cells/`, the sensitivity table
(one row per cell), the ranking, and the cells' rounds / metrics / divergence tables concatenated
with leading columns `cell, local_part, seed, dataset, scheme, alpha`.

Cells are resumable: a finished cell is skipped when the sweep runs again, a cell killed half-way
continues from its checkpoint, and a cell that fails (an exception, a NaN loss) is recorded with its
error in `cells/<cell>/error.txt` while the other cells go on.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from fedsens.personalize import mechanisms, preflight, presets, runio, runlock
from fedsens.personalize import model as model_lib
from fedsens.personalize.errors import UserError
from fedsens.personalize.federation import RunConfig
from fedsens.personalize.methods import method_class
from fedsens.personalize.schema import CELL_COLUMNS, GAIN, SANITY_COLUMNS, SENSITIVITY_COLUMNS, TAIL_GAIN
from fedsens.sensitivity import executors, runs, sanity
from fedsens.sensitivity import ranking as ranking_lib
from fedsens.sensitivity import stats as stats_lib
from fedsens.sensitivity.divergence import METRICS, DivergenceRecorder, block_paths, group_names

DEFAULT_PARTS = ("none", "embed", "attn", "mlp", "norm", "head", "all")


@dataclass(frozen=True)
class SweepConfig:
    """A grid of federated runs. `run` holds every setting the cells share; the grid's axes replace
    its dataset, scheme, alpha, seed and personalize (an empty axis means the one value in `run`),
    and each cell runs in `<out>/cells/<cell name>`. `none` (FedAvg, the reference) is always a cell."""

    run: RunConfig = field(default_factory=RunConfig)
    parts: tuple[str, ...] = DEFAULT_PARTS
    seeds: tuple[int, ...] = (0, 1, 2)
    datasets: tuple[str, ...] = ()
    schemes: tuple[str, ...] = ()
    alphas: tuple[float, ...] = ()
    div_every: int = 1
    probe_size: int = 64
    out: str = "runs/sweep"
    fresh: bool = False
    quiet: bool = False
    force: bool = False  # run the grid even when the FedAvg reference did not learn
    preset: str | None = None  # the personalize.presets name it started from (recorded in protocol.json)

    def __post_init__(self):
        parts = tuple(dict.fromkeys(("none", *(p.strip() for p in self.parts if p.strip()))))
        object.__setattr__(self, "parts", parts)
        for axis in ("datasets", "schemes", "alphas"):
            object.__setattr__(self, axis, tuple(dict.fromkeys(getattr(self, axis))))
        object.__setattr__(self, "seeds", tuple(dict.fromkeys(int(s) for s in self.seeds)))
        if not self.seeds:
            raise UserError("the sweep needs at least one seed; pass e.g. --seeds 0,1,2")
        if any(a <= 0 for a in self.alphas):
            raise UserError(f"every alpha must be > 0 (got {', '.join(map(str, self.alphas))})")
        if self.div_every < 1:
            raise UserError(f"--div-every must be at least 1 (got {self.div_every})")
        fixed = method_class(self.run.method).parts
        if fixed is not None:
            raise UserError(
                f"--method {self.run.method} keeps {fixed} local itself, but the sweep's cells vary the parts "
                "kept local; choose a method that takes --personalize (e.g. fedavg)"
            )

    def partitions(self) -> list[tuple[str, str, float]]:
        """(dataset, scheme, alpha) combinations; an empty axis takes the value in `run`."""
        return list(
            itertools.product(
                self.datasets or (self.run.dataset,),
                self.schemes or (self.run.scheme,),
                self.alphas or (self.run.alpha,),
            )
        )


PER_BLOCK_KINDS = ("attn", "mlp", "norm")


def per_block_parts(model: str, kinds: tuple[str, ...], model_args: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """One part spec per block for each part type in `kinds` (`attn@0`, `attn@1`, ...): `--per-block`."""
    unknown = [kind for kind in kinds if kind not in PER_BLOCK_KINDS]
    if unknown:
        raise UserError(f"--per-block takes {', '.join(PER_BLOCK_KINDS)} (got {', '.join(unknown)})")
    depth = model_lib.block_count(model, model_args)
    return tuple(f"{kind}@{block}" for kind in kinds for block in range(depth))


def expand_mechanisms(config: SweepConfig, names: tuple[str, ...]) -> tuple[SweepConfig, list[str]]:
    """The grid part x mechanism: every part cell but FedAvg once per mechanism (`full` keeps the part's own
    cell, `attn`; any other is the cell `attn:lora`), and the (part, mechanism) pairs that do not apply to the
    model (LoRA on the convolutional embedding, prompts on Swin ...), each with its reason: `--mechanisms`."""
    for name in names:
        mechanisms.mechanism_class(name)
    if not names:
        raise UserError("--mechanisms needs at least one mechanism, e.g. full,lora,bias")
    run = config.run
    spec = model_lib.input_spec(run.model, data_channels=3, data_size=32, model_args=run.model_args)
    model = model_lib.build(run.model, 2, spec.in_chans, spec.img_size, patch_size=spec.patch_size or None,
                            model_args=run.model_args)  # fmt: skip
    cells: list[str] = []
    skipped: list[str] = []
    for part in config.parts:
        for name in names if part != "none" else (mechanisms.FULL,):
            cell = part if name == mechanisms.FULL else f"{part}:{name}"
            if name != mechanisms.FULL and any(t.mechanism != mechanisms.FULL for t in mechanisms.parse(part)):
                skipped.append(f"{cell}: {part} already names its mechanism")
                continue
            try:
                mechanisms.install(copy.deepcopy(model), cell)
            except UserError as err:
                skipped.append(f"{cell}: {err}")
                continue
            cells.append(cell)
    return dataclasses.replace(config, parts=tuple(cells)), skipped


@dataclass(frozen=True)
class Cell:
    dataset: str
    scheme: str
    alpha: float
    seed: int
    local_part: str

    @property
    def partition(self) -> tuple[str, str, float]:
        return self.dataset, self.scheme, self.alpha

    @property
    def name(self) -> str:
        """Readable and filesystem-safe, e.g. digits-dirichlet-a0.3-s0-attn+head."""
        scheme = self.scheme
        if scheme.endswith(".json"):  # a partition file: its name plus a digest of its path, so two never clash
            scheme = f"{Path(scheme).stem}.{hashlib.sha1(scheme.encode()).hexdigest()[:6]}"
        return "-".join(
            runio.slug(s) for s in (self.dataset, scheme, f"a{self.alpha:g}", f"s{self.seed}", self.local_part)
        )


@dataclass(frozen=True)
class SweepResult:
    out: Path
    sensitivity: pd.DataFrame
    ranking: pd.DataFrame
    tables: dict[str, pd.DataFrame]  # rounds, metrics, divergence concatenated over cells
    ran: tuple[str, ...]  # cells trained (or continued) by this call
    skipped: tuple[str, ...]  # cells already finished
    failed: tuple[str, ...]
    seconds: float


def preset(name: str) -> SweepConfig:
    """A named protocol (personalize.presets) as a sweep; callers override its fields (the CLI: every
    option given explicitly). quick (the default): the embedded default with 30 rounds and divergence
    every 5 rounds; paper-*: the paper's settings (GPU-sized)."""
    chosen = presets.get(name)
    return SweepConfig(run=chosen.run_config(), preset=name, **chosen.sweep)


def protocol(config: SweepConfig) -> dict:
    """The protocol every cell follows (the cells differ only in the part kept local and the grid's axes)."""
    record = presets.protocol(config.run, preset=config.preset)
    # The grid's axes replace the run's dataset, scheme and alpha in every cell: show what the cells use.
    for key, axis in (("dataset", config.datasets), ("partition", config.schemes), ("alpha", config.alphas)):
        if axis:
            record[key] = axis[0] if len(axis) == 1 else list(axis)
    record.update(seeds=list(config.seeds), cells=list(config.parts), div_every=config.div_every)
    return record


def grid(config: SweepConfig) -> list[Cell]:
    """The cells in run order: partition by partition, seed by seed, FedAvg first."""
    return [
        Cell(*partition, seed, part)
        for partition in config.partitions()
        for seed in config.seeds
        for part in config.parts
    ]


def cell_config(config: SweepConfig, cell: Cell) -> RunConfig:
    return config.run.replace(
        dataset=cell.dataset,
        scheme=cell.scheme,
        alpha=cell.alpha,
        seed=cell.seed,
        personalize=cell.local_part,
        out=str(Path(config.out) / "cells" / cell.name),
    )


def cell_hooks(div_every: int, probe_size: int) -> tuple:
    """A cell's hooks, built where the cell trains: the divergence recorder."""
    return (DivergenceRecorder(every=div_every, probe_size=probe_size),)


def cell_job(config: SweepConfig, cell: Cell) -> executors.Job:
    """The cell as a job any executor can run (its hooks travel as a picklable factory)."""
    return executors.Job(
        cell.name, cell_config(config, cell), functools.partial(cell_hooks, config.div_every, config.probe_size)
    )


def run_sweep(config: SweepConfig, executor: executors.ExecutorConfig | None = None) -> SweepResult:
    """Run every cell not yet finished (in this process, or where `executor` says), then write the
    sweep's tables and ranking. The sweep folder is locked meanwhile: a second sweep on it is refused."""
    with runlock.hold(runlock.folder(config.out), what="sweep", notify=tqdm.write):
        return _run_sweep_locked(config, executor)


def _run_sweep_locked(config: SweepConfig, executor: executors.ExecutorConfig | None) -> SweepResult:
    started = time.perf_counter()
    out = Path(config.out)
    cells = grid(config)
    preflight.check(cell_config(config, cell) for cell in cells)  # bad input stops here, before any cell
    presets.write_protocol(out, protocol(config))
    if not config.fresh:
        for cell in cells:
            wanted = cell_config(config, cell)
            runs.check_same_settings(Path(wanted.out), wanted)
    runio.write_json(out / "sweep.json", {**dataclasses.asdict(config), "cells": [c.name for c in cells]})
    jobs = [cell_job(config, cell) for cell in cells]
    status = sanity.run_checked_grid(
        jobs,
        jobs[0],
        out,
        executor=executor,
        force=config.force,
        fresh=config.fresh,
        quiet=config.quiet,
        desc="sweep",
        where=f"cell {jobs[0].name}",
    )
    outcome: dict[str, list[str]] = {"done": [], "skipped": [], "failed": []}
    for cell in cells:
        outcome[status[cell.name]].append(cell.name)
    tables = write_tables(out, cells)
    return SweepResult(
        out,
        tables.pop("sensitivity"),
        tables.pop("ranking"),
        tables,
        tuple(outcome["done"]),
        tuple(outcome["skipped"]),
        tuple(outcome["failed"]),
        time.perf_counter() - started,
    )


# ---- tables --------------------------------------------------------------------------------------


def _concatenated(out: Path, cells: list[Cell], table: str) -> pd.DataFrame:
    folders = [
        (
            dict(
                cell=cell.name,
                local_part=cell.local_part,
                seed=cell.seed,
                dataset=cell.dataset,
                scheme=cell.scheme,
                alpha=cell.alpha,
            ),
            out / "cells" / cell.name,
        )
        for cell in cells
    ]
    return runs.concatenated(folders, table, CELL_COLUMNS)


def _part_divergence(parts: pd.DataFrame, reference: pd.DataFrame) -> dict[str, float]:
    """The FedAvg cell's divergence over the groups a cell keeps local (mean over groups and rounds)."""
    nan = {f"div_{m}": float("nan") for m in METRICS}
    if not len(parts) or not len(reference) or "local" not in parts:
        return nan
    local = parts[parts["local"].astype(bool)]
    groups = set(group_names(local, part_names=set(parts["part"]), blocks=block_paths(parts)))
    rows = reference[reference["group"].isin(groups)]
    means = rows.groupby("metric")["value"].mean()
    return {f"div_{m}": float(means.get(m, float("nan"))) for m in METRICS}


def _traffic(rounds: pd.DataFrame) -> dict[str, float]:
    """Mean bytes per round each way (NaN for a cell with no finished rounds)."""
    return {
        column: float(rounds[column].mean()) if column in rounds and len(rounds) else float("nan")
        for column in ("up_bytes", "down_bytes")
    }


def sensitivity_table(out: Path, cells: list[Cell]) -> pd.DataFrame:
    """One row per cell, paired with the FedAvg cell of the same partition and seed."""
    rows = []
    for cell in cells:
        folder = out / "cells" / cell.name
        status = runs.status(folder)
        summary = runio.read_json(folder / "summary.json") if (folder / "summary.json").exists() else {}
        rounds = runs.read_csv(folder / "rounds.csv") if status == "done" else pd.DataFrame()
        accuracy = runs.final_accuracy(rounds)
        if status == "done":
            accuracy["acc_best"] = summary.get("acc_best", accuracy["acc_best"])
        reference = out / "cells" / dataclasses.replace(cell, local_part="none").name
        rows.append(
            dict(
                dataset=cell.dataset,
                scheme=cell.scheme,
                alpha=cell.alpha,
                seed=cell.seed,
                local_part=cell.local_part,
                status=status,
                **accuracy,
                **stats_lib.tail_accuracy(rounds),
                local_params=summary.get("local_params", float("nan")),
                comm_bytes_per_round=summary.get("comm_bytes_per_round", float("nan")),
                **_part_divergence(runs.read_csv(folder / "parts.csv"), runs.read_csv(reference / "divergence.csv")),
                cell=cell.name,
                rounds=summary.get("rounds", float("nan")),
                mechanism=mechanisms.mechanism_of(cell.local_part),
                **_traffic(rounds),
            )
        )
    derived = (GAIN, TAIL_GAIN, "comm_saved", *SANITY_COLUMNS)
    table = pd.DataFrame(rows, columns=[c for c in SENSITIVITY_COLUMNS if c not in derived])
    keys = ["dataset", "scheme", "alpha", "seed"]
    fedavg = table.loc[table["local_part"] == "none", keys + ["acc_mean", "acc_tail", "comm_bytes_per_round"]]
    paired = table.merge(fedavg, on=keys, how="left", suffixes=("", "_fedavg"))
    table["gain_vs_fedavg"] = (paired["acc_mean"] - paired["acc_mean_fedavg"]).to_numpy()
    table["gain_tail_vs_fedavg"] = (paired["acc_tail"] - paired["acc_tail_fedavg"]).to_numpy()
    table["comm_saved"] = (1 - paired["comm_bytes_per_round"] / paired["comm_bytes_per_round_fedavg"]).to_numpy()
    table = sanity.sanity_columns(table, out / "cells")
    return table[SENSITIVITY_COLUMNS]


def write_tables(out: Path, cells: list[Cell]) -> dict[str, pd.DataFrame]:
    """sensitivity.csv, ranking.csv and the concatenated rounds / metrics / divergence tables."""
    tables = {name: _concatenated(out, cells, name) for name in ("rounds", "metrics", "divergence")}
    tables["sensitivity"] = sensitivity_table(out, cells)
    headline = stats_lib.headline_protocols(tables["rounds"])
    gains = stats_lib.paired_gains(stats_lib.client_outcomes(tables["metrics"], headline))
    tables["ranking"] = ranking_lib.rank(tables["sensitivity"], gains)
    for name, frame in tables.items():
        runio.write_table(out / f"{name}.csv", frame.to_dict("records"), list(frame.columns))
    return tables
