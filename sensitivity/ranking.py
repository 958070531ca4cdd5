"""From the sensitivity table to a ranking of parts, and from the ranking to a part spec for `train`.

The accuracy ranking orders parts by their mean gain over FedAvg across seeds, each cell scored by its
mean client accuracy over the last evaluated rounds (`gain_tail_vs_fedavg`; `score_last` keeps the
final-round gain beside it). Beside the t-interval across seeds: the hierarchical-bootstrap interval of
the per-client paired gain (`boot_low/high`), Friedman's mean rank and p-value over the parts, and for
each part whether its order against the next-ranked part is resolved at 95% (see sensitivity/stats.py).
Each divergence metric, measured in the FedAvg cells alone, gives its own ranking
(higher drift / weight divergence, lower update cosine / CKA = more sensitive), with its Spearman
correlation to the accuracy ranking: does one cheap FedAvg run predict the expensive sweep?

A cell is a part and the mechanism that keeps it local (`attn`, `attn:lora`: personalize.mechanisms); the
accuracy rows carry the cell's mechanism, its local parameters and its gain per 10,000 of them.

What is ranked: every cell's part except `none` (the reference). `all` (everything local, no
federation) is reported in the accuracy block with its gain and interval but not ranked (rank NaN):
it is the no-sharing extreme, not a part one could keep local, and `top_parts` must never pick it.
It has no divergence rows either (its "part" would be the whole model).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from fedsens.personalize import mechanisms, runio
from fedsens.personalize.errors import CorruptFileError, UserError
from fedsens.personalize.ranks import kendall_tau, spearman
from fedsens.personalize.schema import DIVERGENCE_METRICS, GAIN, RANKING_COLUMNS, TAIL_GAIN
from fedsens.sensitivity import sanity
from fedsens.sensitivity import stats as stats_lib

# Whether a larger value of the metric means the clients pull the part further apart.
HIGHER_IS_MORE_SENSITIVE = {"update_cos": False, "rel_drift": True, "weight_div": True, "cka": False}
UNRANKED = ("none", "all")


def t_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided Student-t interval of the mean; with one value the interval is NaN (unknown)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if len(values) == 1:
        return mean, math.nan, math.nan
    sem = float(stats.sem(values))
    if sem == 0:
        return mean, mean, mean
    low, high = stats.t.interval(confidence, len(values) - 1, loc=mean, scale=sem)
    return mean, float(low), float(high)


def _unranked(cell: str) -> bool:
    """FedAvg and local-only, whatever mechanism keeps `all` local."""
    return str(cell) in UNRANKED or mechanisms.parts_of(str(cell)) in UNRANKED


def _cost(gain: pd.DataFrame, done: pd.DataFrame) -> pd.DataFrame:
    """The accuracy block's mechanism, local parameters and gain per 10k local parameters."""
    gain["mechanism"] = gain["part"].map(lambda cell: mechanisms.mechanism_of(str(cell)))
    params = done.groupby("local_part")["local_params"].mean() if "local_params" in done else pd.Series(dtype=float)
    gain["local_params"] = gain["part"].map(params)
    per = gain["score"] / gain["local_params"].where(gain["local_params"] > 0) * 1e4
    gain["gain_per_10k"] = per
    return gain


def _block(table: pd.DataFrame, column: str, metric: str, higher_first: bool, confidence: float) -> pd.DataFrame:
    rows = []
    for part, cells in table.groupby("local_part", sort=False):
        score, low, high = t_interval(cells[column].to_numpy(), confidence)
        rows.append(dict(part=part, score=score, ci_low=low, ci_high=high, metric=metric))
    block = pd.DataFrame(rows, columns=["part", "score", "ci_low", "ci_high", "metric"])
    rankable = block["score"].notna() & ~block["part"].map(_unranked).astype(bool)
    block["rank"] = block["score"].where(rankable).rank(ascending=not higher_first, method="min")
    return block.sort_values(["rank", "part"], na_position="last").reset_index(drop=True)


def _client_statistics(gain: pd.DataFrame, gains: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """The accuracy block with the per-client paired statistics laid beside it (rows keep their order)."""
    ranked = gain.dropna(subset=["rank"])["part"].tolist()
    boot = {
        part: stats_lib.hierarchical_bootstrap(stats_lib.seed_client_matrix(gains, part), confidence=confidence)
        for part in gain["part"]
    }
    gain["boot_low"] = [boot[p][0] for p in gain["part"]]
    gain["boot_high"] = [boot[p][1] for p in gain["part"]]
    friedman_p, mean_rank = stats_lib.friedman(stats_lib.blocks_by_parts(gains, ranked))
    gain["mean_rank"] = gain["part"].map(mean_rank)
    gain["friedman_p"] = friedman_p
    adjacent = stats_lib.adjacent_resolution(gains, ranked, confidence=confidence).set_index("part")
    for column in ("diff_low", "diff_high", "resolved_vs_next", "p_vs_next"):
        gain[column] = gain["part"].map(adjacent[column]) if len(adjacent) else math.nan
    return gain


def rank_partition(table: pd.DataFrame, confidence: float = 0.95, gains: pd.DataFrame | None = None) -> pd.DataFrame:
    """The ranking blocks of one partition's sensitivity rows (all seeds); `gains`: its per-client paired
    gains (sensitivity.stats.paired_gains), which add the bootstrap, Friedman and resolution columns."""
    parts = table[table["local_part"] != "none"]
    column = TAIL_GAIN if TAIL_GAIN in parts and parts[TAIL_GAIN].notna().any() else GAIN
    ok = parts["status"] == "done"
    done = parts.assign(**{GAIN: parts[column].where(ok), "last": parts[GAIN].where(ok)})  # failed cell: NaN
    gain = _block(done, GAIN, GAIN, higher_first=True, confidence=confidence)
    gain["spearman_vs_gain"] = math.nan  # the accuracy ranking itself
    gain["score_last"] = gain["part"].map(done.groupby("local_part")["last"].mean())
    gain = _cost(gain, done)
    if gains is not None and len(gains):
        gain = _client_statistics(gain, gains, confidence)
    blocks = [gain]
    accuracy_order = gain.set_index("part")["score"].where(gain.set_index("part")["rank"].notna())
    for metric in DIVERGENCE_METRICS:
        higher = HIGHER_IS_MORE_SENSITIVE[metric]
        shared = parts[parts["local_part"].map(lambda cell: mechanisms.parts_of(str(cell))) != "all"]
        block = _block(shared, f"div_{metric}", metric, higher, confidence)
        sensitivity = block.set_index("part")["score"] * (1 if higher else -1)
        block["spearman_vs_gain"] = spearman(sensitivity, accuracy_order)
        blocks.append(block)
    return pd.concat(blocks, ignore_index=True)


def rank(sensitivity: pd.DataFrame, gains: pd.DataFrame | None = None, confidence: float = 0.95) -> pd.DataFrame:
    """ranking.csv: per partition, the accuracy block then one block per divergence metric."""
    keys = ["dataset", "scheme", "alpha"]
    frames = []
    for (dataset, scheme, alpha), table in sensitivity.groupby(keys, sort=False):
        mine = None
        if gains is not None and len(gains):
            mine = gains[(gains["dataset"] == dataset) & (gains["scheme"] == scheme) & (gains["alpha"] == alpha)]
        frame = rank_partition(table, confidence, mine)
        frame["dataset"], frame["scheme"], frame["alpha"] = dataset, scheme, alpha
        frame["trustworthy"] = sanity.ranking_trust(frame, table)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=RANKING_COLUMNS)
    return pd.concat(frames, ignore_index=True).reindex(columns=RANKING_COLUMNS)


def accuracy_order(ranking: pd.DataFrame) -> pd.Series:
    """Ranked parts by gain, best first (mean score over partitions when the sweep has several)."""
    gains = ranking[(ranking["metric"] == GAIN) & ranking["rank"].notna()]
    return gains.groupby("part", sort=False)["score"].mean().sort_values(ascending=False, kind="stable")


def top_parts(sweep_dir: str | Path, k: int) -> str:
    """The part spec that keeps the sweep's top-k parts (by accuracy gain over FedAvg) local.

    The k best parts are taken as ranked, even when a gain is negative; terms repeated across parts
    (e.g. `attn` and `attn,head`) appear once. Used by `fedsens train --personalize auto --from DIR --top K`.
    """
    path = Path(sweep_dir) / "ranking.csv"
    if not path.is_file():
        if (Path(sweep_dir) / "config.json").is_file():  # a run folder, not a sweep's
            raise UserError(
                f"{sweep_dir} is a run folder (fedsens train), not a sweep; pass --from the --out of `fedsens sweep`"
            )
        raise UserError(
            f"{sweep_dir} is not a finished sweep folder (no ranking.csv); run `fedsens sweep --out DIR` first "
            "and pass that DIR to --from"
        )
    if k < 1:
        raise UserError(f"--top must be at least 1 (got {k})")
    table = runio.read_table(path, "run the sweep again to rewrite it", required=())
    missing = [c for c in ("part", "metric", "rank", "score") if c not in table.columns]
    if missing:
        raise CorruptFileError(
            path, f"empty or without the column(s) {', '.join(missing)}", "run the sweep again to rewrite it"
        )
    order = accuracy_order(table)
    if len(order) == 0:
        raise UserError(
            f"the sweep in {sweep_dir} ranked no part (no finished cell beside FedAvg); finish the sweep first"
        )
    if k > len(order):
        raise UserError(
            f"--top {k} but the sweep in {sweep_dir} ranks only {len(order)} parts "
            f"({', '.join(order.index)}); use --top {len(order)} or less"
        )
    terms = [term.strip() for part in order.index[:k] for term in str(part).split(",")]
    return ",".join(dict.fromkeys(terms))


SPLIT_COLUMNS = ["dataset", "scheme", "alpha", "seeds_a", "seeds_b", "order_a", "order_b", "kendall_tau"]


def seed_half_agreement(sensitivity: pd.DataFrame) -> pd.DataFrame:
    """Per partition: the accuracy ranking of each of two disjoint halves of the seeds, and Kendall's tau
    between the two halves' scores of the ranked parts (1 = the same order; NaN below 2 seeds)."""
    rows = []
    for (dataset, scheme, alpha), table in sensitivity.groupby(["dataset", "scheme", "alpha"], sort=False):
        first, second = stats_lib.seed_halves(table["seed"].unique().tolist())
        scores, orders = [], []
        for half in (first, second):
            block = rank_partition(table[table["seed"].isin(half)]) if half else pd.DataFrame(columns=RANKING_COLUMNS)
            gain = block[(block["metric"] == GAIN)].dropna(subset=["rank"])
            scores.append(gain.set_index("part")["score"])
            orders.append(" > ".join(gain["part"]))
        rows.append(
            dict(
                dataset=dataset,
                scheme=scheme,
                alpha=alpha,
                seeds_a=",".join(map(str, first)),
                seeds_b=",".join(map(str, second)),
                order_a=orders[0],
                order_b=orders[1],
                kendall_tau=kendall_tau(scores[0], scores[1]),
            )
        )
    return pd.DataFrame(rows, columns=SPLIT_COLUMNS)


def write_seed_half_agreement(sweep_dir: str | Path) -> pd.DataFrame:
    """split_seeds.csv in a finished sweep folder, from its sensitivity.csv."""
    path = Path(sweep_dir) / "sensitivity.csv"
    if not path.is_file():
        raise UserError(f"{sweep_dir} is not a finished sweep folder (no sensitivity.csv)")
    table = seed_half_agreement(pd.read_csv(path))
    runio.write_table(Path(sweep_dir) / "split_seeds.csv", table.to_dict("records"), list(table.columns))
    return table
