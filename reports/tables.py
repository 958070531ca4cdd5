"""Reading a run, sweep, comparison or bench folder into DataFrames, and shaping them for the figures.

Only CSV and JSON are read here (the layouts in DESIGN.md and BRIEF.md); nothing is trained.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedsens.personalize import runio
from fedsens.personalize.errors import UserError

# What each kind of folder's configuration file is called (a bench folder has none: each row of bench.csv
# names its own configuration), and the tables it may hold.
CONFIG_FILES = {
    "run": "config.json",
    "sweep": "sweep.json",
    "comparison": "compare.json",
    "validation": "validate.json",
}
TABLE_FILES = {
    "run": ("rounds", "metrics", "divergence", "parts"),
    "sweep": ("sensitivity", "ranking", "rounds", "metrics", "divergence"),
    "comparison": ("comparison", "summary", "rounds", "metrics"),
    "bench": ("bench",),
    "validation": ("validation_summary", "validation", "validation_metrics"),
}
# Where `fedsens validate --out SWEEP/validate` writes the validation of a sweep's settings.
SWEEP_VALIDATION = Path("validate")
# Where `fedsens probe --from SWEEP` writes its ranking (rows of ranking.csv's shape, metric probe_gain).
PROBE_RANKING = Path("probe") / "probe_ranking.csv"
# The column that tells the runs of a sweep or comparison apart in a figure (one line / box each).
GROUP_COLUMNS = ("method", "local_part")


def detect(folder: str | Path) -> str:
    """Say whether `folder` is a "run", a "sweep", a "comparison" or a "bench" folder, by the tables it holds."""
    path = Path(folder)
    if path.is_file():
        raise UserError(
            f"{path} is a file; pass the folder that `fedsens train`, `sweep`, `compare` or `bench` wrote (--out)"
        )
    if not path.is_dir():
        raise UserError(f"report folder {path} does not exist; pass a run, sweep, comparison or bench folder")
    if (path / "comparison.csv").is_file():
        return "comparison"
    if (path / "sensitivity.csv").is_file():
        return "sweep"
    if (path / "config.json").is_file() and (path / "rounds.csv").is_file():
        return "run"
    if (path / "bench.csv").is_file():
        return "bench"
    if (path / "validation_summary.csv").is_file():
        return "validation"
    unfinished = (("sweep.json", "sensitivity.csv", "sweep"), ("compare.json", "comparison.csv", "compare"))
    for config, table, command in unfinished:
        if (path / config).is_file():
            raise UserError(
                f"{path} is an unfinished {command}: {table} is written when `fedsens {command}` "
                f"completes; run it again with the same --out to finish (finished runs are kept)"
            )
    raise UserError(
        f"{path} is not a run, sweep, comparison or bench folder: looked for comparison.csv (comparison), "
        "sensitivity.csv (sweep), config.json with rounds.csv (run) or bench.csv (bench); "
        "pass the --out folder of `fedsens train`, `sweep`, `compare` or `bench`"
    )


@dataclass(frozen=True)
class FolderTables:
    """Everything a report reads from one folder; tables that are absent are simply not in `frames`."""

    folder: Path
    kind: str
    config: dict
    frames: dict[str, pd.DataFrame]
    summary: dict | None = None
    partition: dict | None = None
    partition_source: str | None = None
    missing: tuple[str, ...] = field(default=())
    problems: tuple[str, ...] = field(default=())  # what was wrong with the tables and what the report used

    def has(self, *names: str) -> bool:
        return all(name in self.frames for name in names)


def read_folder(folder: str | Path) -> FolderTables:
    """Detect the folder's kind and read its configuration, tables, summary and one partition."""
    path = Path(folder)
    kind = detect(path)
    frames: dict[str, pd.DataFrame] = {}
    missing: list[str] = []
    problems: list[str] = []
    for name in TABLE_FILES[kind]:
        table = _read_csv(path / f"{name}.csv", problems)
        if table is None:
            missing.append(f"{name}.csv")
        else:
            frames[name] = table
    probe = _read_csv(path / PROBE_RANKING, problems) if kind == "sweep" else None
    if probe is not None and "ranking" in frames:  # `fedsens probe --from` this sweep: one more ranking source
        frames["ranking"] = pd.concat([frames["ranking"], probe], ignore_index=True)
    if kind == "sweep":  # the validation of the sweep's settings, when `fedsens validate` wrote one into it
        frames.update(_sweep_validation(path, problems))
    problems.extend(_inconsistencies(frames))
    partition_path = _partition_path(path, kind)
    if partition_path is None:
        missing.append("partition.json")
    return FolderTables(
        folder=path,
        kind=kind,
        config=(_read_json(path / CONFIG_FILES[kind]) if kind in CONFIG_FILES else None) or {},
        frames=frames,
        summary=_read_json(path / "summary.json") if kind == "run" else None,
        partition=_read_json(partition_path) if partition_path else None,
        partition_source=str(partition_path.relative_to(path)) if partition_path else None,
        missing=tuple(missing),
        problems=tuple(problems),
    )


def _sweep_validation(path: Path, problems: list[str]) -> dict[str, pd.DataFrame]:
    """The tables of `path/validate/` when they validate the sweep's own settings (validate.json's `settings`:
    every run setting but the data and partition, the seeds and the ranked cells, as sweep.json has them)."""
    record = _read_json(path / SWEEP_VALIDATION / "validate.json")
    sweep = _read_json(path / "sweep.json")
    if not record or not sweep:
        return {}
    settings = record.get("settings", {})
    ranked = [part for part in sweep.get("parts", []) if part != "all"]
    same = all(sweep.get("run", {}).get(key) == value for key, value in settings.get("run", {}).items())
    same = same and settings.get("seeds") == sweep.get("seeds") and settings.get("parts") == ranked
    if not same:
        problems.append(f"{SWEEP_VALIDATION}/ holds a validation of other settings than this sweep's; it is not shown")
        return {}
    tables = {name: _read_csv(path / SWEEP_VALIDATION / f"{name}.csv", problems) for name in TABLE_FILES["validation"]}
    return {name: table for name, table in tables.items() if table is not None}


# The columns without which a table cannot be drawn from; the rest are optional.
REQUIRED_COLUMNS = {
    "rounds": ("round", "acc_mean"),
    "metrics": ("round", "client", "accuracy"),
    "divergence": ("round", "group", "part", "metric", "value"),
    "parts": ("param", "part"),
    "sensitivity": ("local_part", "seed"),
    "ranking": ("part", "metric", "rank"),
    "comparison": ("method", "seed"),
    "bench": ("config", "loop", "clients"),  # a failed configuration's row has only these and `error`
}


def _read_csv(path: Path, problems: list[str]) -> pd.DataFrame | None:
    """A table, validated: a garbled file is an error naming it; a last line cut short (a run killed or a
    copy broken mid-write) is dropped and noted, as are rows whose key columns are empty."""
    if not path.is_file() or not path.read_bytes().strip():
        return None
    # encoding, shape and the types of the known columns are checked there; the required columns here
    table = runio.read_table(path, "re-run the command that wrote it", required=(), allow_cut_short=True)
    required = REQUIRED_COLUMNS.get(path.stem, ())
    absent = [column for column in required if column not in table.columns]
    if absent:
        raise UserError(
            f"{path} lacks the column(s) {', '.join(absent)} (has: {', '.join(map(str, table.columns))}); "
            "re-run the command that wrote it"
        )
    if not path.read_bytes().endswith(b"\n"):  # read_table left that line out
        problems.append(f"{path.name} ends mid-line (cut short); its incomplete last row was left out")
    keys = [column for column in required if column in ("round", "client", "seed", "method", "local_part", "part")]
    incomplete = table[keys].isna().any(axis=1) if keys else pd.Series(False, index=table.index)
    if incomplete.any():
        problems.append(f"{path.name}: {int(incomplete.sum())} row(s) with empty {'/'.join(keys)} left out")
        table = table[~incomplete]
    return table.reset_index(drop=True) if len(table) else None


def _inconsistencies(frames: dict[str, pd.DataFrame]) -> list[str]:
    """Tables of one folder that disagree (a run's metrics.csv and rounds.csv from different moments)."""
    rounds, metrics = frames.get("rounds"), frames.get("metrics")
    if rounds is None or metrics is None or "cell" in metrics.columns or "method" in metrics.columns:
        return []
    problems = []
    evaluated = rounds.dropna(subset=["acc_mean"])
    last_rounds = int(evaluated["round"].max()) if len(evaluated) else None
    last_metrics = int(metrics["round"].max())
    if last_rounds is not None and last_metrics != last_rounds:
        problems.append(
            f"metrics.csv ends at round {last_metrics} but rounds.csv at round {last_rounds}; "
            f"per-client figures use round {last_metrics}"
        )
    groups = metrics.groupby("protocol") if "protocol" in metrics.columns else [(None, metrics)]
    for protocol, rows in groups:
        per_round = rows.groupby("round")["client"].nunique()
        if per_round.iloc[-1] < per_round.max():
            which = f" ({protocol} protocol)" if protocol is not None else ""
            problems.append(
                f"metrics.csv's last round {last_metrics} holds {per_round.iloc[-1]} of {per_round.max()} "
                f"clients{which}; per-client figures use only those"
            )
    return problems


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # not JSON, or not UTF-8 text
        raise UserError(f"{path} is not valid JSON ({err}); re-run the command that wrote it") from None


def _partition_path(folder: Path, kind: str) -> Path | None:
    """A run's own partition.json, or the first cell's / run's for a sweep / comparison; none for a bench,
    whose runs/ hold throwaway populations (a 10,000-client partition.json is slow to read and not reported)."""
    if kind in ("bench", "validation"):
        return None
    if kind == "run":
        candidates = [folder / "partition.json"]
    else:
        sub = folder / ("cells" if kind == "sweep" else "runs")
        candidates = sorted(sub.glob("*/partition.json")) if sub.is_dir() else []
    return next((path for path in candidates if path.is_file()), None)


def group_column(table: pd.DataFrame) -> str | None:
    """The column whose values are the methods / kept-local parts to compare, if the table has one."""
    return next((column for column in GROUP_COLUMNS if column in table.columns), None)


def run_columns(table: pd.DataFrame) -> list[str]:
    """The columns that together name one federated run in a concatenated table."""
    if "cell" in table.columns:
        return ["cell"]
    return [column for column in ("method", "seed") if column in table.columns]


def headline_protocol(frames: dict[str, pd.DataFrame]) -> str | None:
    """The evaluation protocol of the accuracies the tables headline (rounds.csv's `protocol`), if recorded."""
    for name in ("rounds", "comparison"):
        frame = frames.get(name)
        if frame is not None and "protocol" in frame.columns and frame["protocol"].notna().any():
            return ",".join(sorted(set(frame["protocol"].dropna().astype(str))))
    return None


def final_client_accuracy(metrics: pd.DataFrame, protocol: str | None = None) -> pd.DataFrame:
    """Each client's test accuracy at its run's last evaluated round (one row per run and client), under
    `protocol` when metrics.csv records several (default: after-aggregation)."""
    test = metrics[metrics["split"] == "test"].dropna(subset=["accuracy"])
    if "protocol" in test.columns and test["protocol"].notna().any():
        test = test[test["protocol"] == (protocol or "after-aggregation")]
    keys = run_columns(test)
    if not keys:
        return test[test["round"] == test["round"].max()].reset_index(drop=True)
    last = test.groupby(keys)["round"].transform("max")
    return test[test["round"] == last].reset_index(drop=True)


def partition_counts(partition: dict) -> pd.DataFrame:
    """partition.json's histograms as long form: client, axis ("class" / "domain"), name, count."""
    pieces = [_histogram_rows(partition["label_histogram"], partition.get("classes"), "class")]
    if partition.get("domain_histogram") is not None:
        pieces.append(_histogram_rows(partition["domain_histogram"], partition.get("domain_names"), "domain"))
    return pd.concat(pieces, ignore_index=True)


def _histogram_rows(histogram: list[list[int]], names: list[str] | None, axis: str) -> pd.DataFrame:
    counts = np.asarray(histogram, dtype=np.int64)
    names = list(names) if names and len(names) == counts.shape[1] else [str(i) for i in range(counts.shape[1])]
    clients, columns = np.meshgrid(np.arange(counts.shape[0]), np.arange(counts.shape[1]), indexing="ij")
    return pd.DataFrame(
        {
            "client": clients.ravel(),
            "axis": axis,
            "name": [names[c] for c in columns.ravel()],
            "count": counts.ravel(),
        }
    )


def fedavg_divergence(divergence: pd.DataFrame) -> pd.DataFrame:
    """A sweep's divergence rows from its FedAvg cells (local_part "none"); a run's rows unchanged."""
    if "local_part" not in divergence.columns:
        return divergence
    fedavg = divergence[divergence["local_part"] == "none"]
    return fedavg if len(fedavg) else divergence


def gain_ranking(ranking: pd.DataFrame) -> pd.DataFrame:
    """The accuracy-gain rows of ranking.csv, most sensitive part first, unranked parts (`all`) last."""
    rows = ranking[ranking["metric"] == "gain_vs_fedavg"]
    return rows.sort_values("rank", na_position="last", kind="stable").reset_index(drop=True)


def pareto_cells(rows: pd.DataFrame) -> list[str]:
    """The cells (`part`) no other cell beats on both gain (`score`, higher) and cost (`local_params`, lower):
    another cell at least as good on both and better on one dominates it. Rows without either are left out."""
    known = rows.dropna(subset=["score", "local_params"])
    front = []
    for _, row in known.iterrows():
        better = known[(known["score"] >= row["score"]) & (known["local_params"] <= row["local_params"])]
        strictly = (better["score"] > row["score"]) | (better["local_params"] < row["local_params"])
        if not strictly.any():
            front.append(str(row["part"]))
    return front


PARTITION_COLUMNS = ("dataset", "scheme", "alpha")


def by_partition(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Split a sweep table by partition (dataset, scheme, alpha): [(label, rows)], label "" for one."""
    keys = [column for column in PARTITION_COLUMNS if column in table.columns]
    groups = list(table.groupby(keys, sort=False)) if keys else []
    if len(groups) <= 1:
        return [("", table)]
    return [
        ("/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values), rows.reset_index(drop=True))
        for values, rows in groups
    ]


def ok_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Drop the rows of failed cells / runs (status "failed"), which carry no accuracy."""
    if "status" not in table.columns:
        return table
    return table[table["status"].fillna("done") != "failed"].reset_index(drop=True)


def untrained_references(sensitivity: pd.DataFrame | None) -> dict[str, str]:
    """Per partition label (as `by_partition` names it), the headline of a sweep whose FedAvg reference did not
    learn in any seed (sensitivity.csv's `trustworthy` False on every finished FedAvg cell); {} when it learned."""
    if sensitivity is None or "trustworthy" not in sensitivity.columns:
        return {}
    headlines = {}
    for label, rows in by_partition(sensitivity):
        reference = rows[(rows["local_part"] == "none") & (rows["status"] == "done")]
        if len(reference) and not reference["trustworthy"].astype(bool).any():
            measured = "; ".join(
                f"seed {int(row.seed)}: {row.acc_mean:.3f} against chance {row.chance:.3f}"
                for row in reference.itertuples()
            )
            headlines[label] = (
                "The reference did not learn; no ranking. FedAvg's mean client accuracy stayed at chance "
                f"({measured}), so every gain over it measures noise; the sweep ran with --force. Raise the rounds, "
                "local epochs, learning rate or model size (`fedsens sweep --calibrate` finds rounds and epochs)."
            )
    return headlines


def untrusted_parts(gains: pd.DataFrame) -> list[str]:
    """The parts of a gain ranking marked not trustworthy in ranking.csv."""
    if "trustworthy" not in gains.columns:
        return []
    marked = gains["trustworthy"].notna() & ~gains["trustworthy"].fillna(True).astype(bool)
    return [str(part) for part in gains.loc[marked, "part"]]


# bench.csv's measures (personalize/benchmark.py); a configuration whose subprocess failed has none of them.
BENCH_MEASURES = ("s_per_round", "train_ratio", "eval_ratio", "round_ratio", "peak_rss_mb", "local_bytes")
# The columns that make one configuration, whichever loop ran it.
BENCH_SETUP = ("clients", "personalize", "join_ratio", "client_store", "rounds")
MIB = 2**20  # peak_rss_mb is ru_maxrss / 1024, so local bytes are shown in the same megabytes


def bench_rows(bench: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """bench.csv split into the measured rows and the failed ones (no measures, an `error` when recorded);
    a bench whose every configuration failed has no measure columns at all, so they are added empty."""
    table = bench.reindex(columns=[*bench.columns, *(c for c in (*BENCH_MEASURES, "error") if c not in bench)])
    measured = table[list(BENCH_MEASURES)].notna().all(axis=1)
    return table[measured].reset_index(drop=True), table[~measured].reset_index(drop=True)


def bench_setup_label(row: pd.Series, varying: Collection[str] = ()) -> str:
    """A configuration as a reader names it: "1,000 clients, head local" ("digits, vit-micro, 20 clients, ..."
    for a dataset's run), plus the join ratio / store / rounds when those differ between the table's
    configurations (`varying`)."""
    label = f"{int(row['clients']):,} clients"
    if pd.notna(row.get("dataset")) and row["dataset"] != "synthetic":  # a preset's run (bench --preset)
        label = f"{row['dataset']}, {row.get('model')}, {label}"
    if pd.notna(row.get("personalize")):
        label += f", {str(row['personalize']).replace(',', '+')} local"
    if "join_ratio" in varying:
        label += f", {row['join_ratio']:.0%} join"
    if "client_store" in varying:
        label += f", {row['client_store']} store"
    if "rounds" in varying:
        label += f", {int(row['rounds'])} rounds"
    return label


def bench_setups(measured: pd.DataFrame) -> pd.Series:
    """Each measured row's configuration label (the same for its fedsens and PFLlib-style rows)."""
    varying = {c for c in BENCH_SETUP[2:] if c in measured and measured[c].nunique(dropna=False) > 1}
    return measured.apply(bench_setup_label, axis=1, varying=varying) if len(measured) else pd.Series(dtype=str)


def bench_speedups(measured: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration measured with both loops: its setup columns, both loops' seconds per round
    and `speedup`, the PFLlib-style loop's round time over fedsens's."""
    setup = [c for c in BENCH_SETUP if c in measured]
    table = measured.assign(setup=bench_setups(measured))
    loops = {loop: table[table["loop"] == loop][[*setup, "setup", "s_per_round"]] for loop in ("fedsens", "pfllib")}
    pairs = loops["fedsens"].merge(loops["pfllib"], on=[*setup, "setup"], suffixes=("_fedsens", "_pfllib"))
    return pairs.assign(speedup=pairs["s_per_round_pfllib"] / pairs["s_per_round_fedsens"])
