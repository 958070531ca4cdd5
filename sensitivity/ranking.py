"""From the sensitivity table to a ranking of parts, and from the ranking to a part spec for `train`.

The accuracy ranking orders parts by their mean gain over FedAvg across seeds (a t-interval across
seeds beside it). Each divergence metric, measured in the FedAvg cells alone, gives its own ranking
(higher drift / weight divergence, lower update cosine / CKA = more sensitive), with its Spearman
correlation to the accuracy ranking: does one cheap FedAvg run predict the expensive sweep?

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

from fedsens.personalize.errors import UserError
from fedsens.personalize.schema import DIVERGENCE_METRICS, GAIN, RANKING_COLUMNS
from fedsens.personalize.stats import spearman
from fedsens.sensitivity import sanity

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


def _block(table: pd.DataFrame, column: str, metric: str, higher_first: bool, confidence: float) -> pd.DataFrame:
    rows = []
    for part, cells in table.groupby("local_part", sort=False):
        score, low, high = t_interval(cells[column].to_numpy(), confidence)
        rows.append(dict(part=part, score=score, ci_low=low, ci_high=high, metric=metric))
    block = pd.DataFrame(rows, columns=["part", "score", "ci_low", "ci_high", "metric"])
    rankable = block["score"].notna() & ~block["part"].isin(UNRANKED)
    block["rank"] = block["score"].where(rankable).rank(ascending=not higher_first, method="min")
    return block.sort_values(["rank", "part"], na_position="last").reset_index(drop=True)


def rank_partition(table: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """The ranking blocks of one partition's sensitivity rows (all seeds)."""
    parts = table[table["local_part"] != "none"]
    done = parts.assign(**{GAIN: parts[GAIN].where(parts["status"] == "done")})  # a failed cell keeps its row, NaN
    gain = _block(done, GAIN, GAIN, higher_first=True, confidence=confidence)
    gain["spearman_vs_gain"] = math.nan  # the accuracy ranking itself
    blocks = [gain]
    accuracy_order = gain.set_index("part")["score"].where(gain.set_index("part")["rank"].notna())
    for metric in DIVERGENCE_METRICS:
        higher = HIGHER_IS_MORE_SENSITIVE[metric]
        block = _block(parts[parts["local_part"] != "all"], f"div_{metric}", metric, higher, confidence)
        sensitivity = block.set_index("part")["score"] * (1 if higher else -1)
        block["spearman_vs_gain"] = spearman(sensitivity, accuracy_order)
        blocks.append(block)
    return pd.concat(blocks, ignore_index=True)


def rank(sensitivity: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """ranking.csv: per partition, the accuracy block then one block per divergence metric."""
    keys = ["dataset", "scheme", "alpha"]
    frames = []
    for (dataset, scheme, alpha), table in sensitivity.groupby(keys, sort=False):
        frame = rank_partition(table, confidence)
        frame["dataset"], frame["scheme"], frame["alpha"] = dataset, scheme, alpha
        frame["trustworthy"] = sanity.ranking_trust(frame, table)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=RANKING_COLUMNS)
    return pd.concat(frames, ignore_index=True)[RANKING_COLUMNS]


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
        raise UserError(
            f"{sweep_dir} is not a finished sweep folder (no ranking.csv); run `fedsens sweep --out {sweep_dir}` first"
        )
    if k < 1:
        raise UserError(f"--top must be at least 1 (got {k})")
    order = accuracy_order(pd.read_csv(path))
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
