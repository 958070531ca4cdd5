"""Paired, per-client statistics for the sweep: pure functions over tables (numpy / scipy).

The outcome of a cell is the mean client accuracy over its last K evaluated rounds (`tail_count`), which
is far less noisy than the final round alone while FedAvg still oscillates. The gain of a cell over FedAvg
is paired per client and seed: the same client, the same data, the same seed, so the FedAvg run's own
luck cancels. Its uncertainty comes from a hierarchical bootstrap (resample seeds, then clients within
each drawn seed), which keeps both sources of variation: which seed was run and which clients there are.

Friedman's test asks whether the parts differ at all, blocking on (seed, client); the post-hoc pairwise
comparisons are two-sided Wilcoxon signed-rank tests on the paired per-(seed, client) outcomes, Holm-corrected
over all pairs. Clients of one seed share a federated model, so those p-values treat correlated units as
independent and are optimistic; the ranking's `resolved_vs_next` flag uses the hierarchical bootstrap instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import stats

PARTITION = ["dataset", "scheme", "alpha"]
TAIL_FRACTION = 0.2
TAIL_MINIMUM = 3


def tail_count(evaluated: int, fraction: float = TAIL_FRACTION, minimum: int = TAIL_MINIMUM) -> int:
    """How many of the last evaluated rounds make the outcome: `fraction` of them, at least `minimum`
    (all of them when there are fewer)."""
    return min(evaluated, max(minimum, math.ceil(fraction * evaluated)))


def tail_rounds(rounds: pd.Series) -> list:
    """The last `tail_count` distinct evaluated round numbers."""
    distinct = sorted(pd.unique(rounds.dropna()))
    return distinct[len(distinct) - tail_count(len(distinct)) :]


def tail_accuracy(rounds: pd.DataFrame) -> dict[str, float]:
    """rounds.csv -> the mean of `acc_mean` over the tail rounds (`acc_tail`) and how many (`tail_rounds`)."""
    evaluated = rounds.dropna(subset=["acc_mean"]) if "acc_mean" in rounds else pd.DataFrame()
    if not len(evaluated):
        return dict(acc_tail=math.nan, tail_rounds=math.nan)
    tail = evaluated[evaluated["round"].isin(tail_rounds(evaluated["round"]))]
    return dict(acc_tail=float(tail["acc_mean"].mean()), tail_rounds=len(tail))


def headline_protocols(rounds: pd.DataFrame) -> dict[str, str]:
    """The sweep's rounds.csv -> each cell's headline evaluation protocol (its `protocol` column)."""
    if not {"cell", "protocol"} <= set(rounds.columns):
        return {}
    named = rounds.dropna(subset=["protocol"]).drop_duplicates("cell", keep="last")
    return dict(zip(named["cell"].astype(str), named["protocol"].astype(str)))


def headline_rows(cell: pd.DataFrame, protocol: str | None) -> pd.DataFrame:
    """One cell's metrics.csv rows of its headline protocol. metrics.csv records both protocols for every
    client and round (schema.EVAL_PROTOCOLS), so statistics over all its rows would mix two protocols while
    the cell's score (rounds.csv's acc_*) uses one. A table without a `protocol` column has one protocol."""
    if "protocol" not in cell.columns or cell["protocol"].nunique(dropna=True) <= 1:
        return cell
    if protocol is None:
        name = cell["cell"].iloc[0] if "cell" in cell.columns else "?"
        raise ValueError(f"cell {name} records several protocols and no headline was given for it")
    return cell[cell["protocol"] == protocol]


def client_outcomes(metrics: pd.DataFrame, headline: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The sweep's metrics.csv -> one row per (partition, seed, part, client): `acc_tail`, the client's mean
    test accuracy over its cell's tail rounds, in the cell's headline protocol (`headline`: cell -> protocol,
    from `headline_protocols(rounds)`), so the grand mean of a part's per-client gains is the cell's score."""
    columns = [*PARTITION, "seed", "local_part", "client", "acc_tail"]
    if not len(metrics):
        return pd.DataFrame(columns=columns)
    test = metrics[metrics["split"] == "test"].dropna(subset=["accuracy"]) if "split" in metrics else metrics
    frames = []
    for name, cell in test.groupby("cell", sort=False):
        cell = headline_rows(cell, (headline or {}).get(str(name)))
        tail = cell[cell["round"].isin(tail_rounds(cell["round"]))]
        frames.append(tail.groupby([*PARTITION, "seed", "local_part", "client"], sort=False)["accuracy"].mean())
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames).rename("acc_tail").reset_index()[columns]


def paired_gains(outcomes: pd.DataFrame) -> pd.DataFrame:
    """Per (partition, seed, client, part): the part's tail accuracy minus FedAvg's (`none`) for the same
    client and seed. Rows without a FedAvg partner are dropped."""
    keys = [*PARTITION, "seed", "client"]
    fedavg = outcomes.loc[outcomes["local_part"] == "none", [*keys, "acc_tail"]]
    paired = outcomes.merge(fedavg, on=keys, suffixes=("", "_fedavg"))
    paired["gain"] = paired["acc_tail"] - paired["acc_tail_fedavg"]
    return paired[[*keys, "local_part", "gain"]]


def seed_client_matrix(gains: pd.DataFrame, part: str) -> np.ndarray:
    """One part's gains as a seeds x clients array (seeds with a missing client are dropped)."""
    rows = gains[gains["local_part"] == part]
    matrix = rows.pivot_table(index="seed", columns="client", values="gain", aggfunc="mean")
    return matrix.dropna(axis=0).to_numpy(dtype=float)


def hierarchical_bootstrap(
    values: np.ndarray, *, draws: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Interval of the grand mean of a seeds x clients array: each draw resamples the seeds with replacement,
    then the clients within each drawn seed. NaN with fewer than two seeds.

    The plain percentile interval is too narrow with few seeds (it covered a null 88% of the time at 3
    seeds, 89% at 5, in tests/test_stats.py's model), so it is Hesterberg's expanded percentile interval:
    the percentiles are widened to match sqrt(S/(S-1)) * t(S-1) for S seeds. With 3 seeds the draws are
    still bounded by the seed means' range, so this interval can be narrower than the t-interval."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or values.shape[0] < 2 or values.shape[1] < 1:
        return math.nan, math.nan
    seeds, clients = values.shape
    rng = np.random.default_rng(seed)
    seed_index = rng.integers(0, seeds, size=(draws, seeds, 1))
    client_index = rng.integers(0, clients, size=(draws, seeds, clients))
    means = values[seed_index, client_index].mean(axis=(1, 2))
    widened = math.sqrt(seeds / (seeds - 1)) * stats.t.ppf(1 - (1 - confidence) / 2, seeds - 1)
    tail = float(stats.norm.cdf(-widened)) * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def holm(pvalues: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment (family-wise error), in the input order."""
    pvalues = np.asarray(pvalues, dtype=float)
    order = np.argsort(pvalues)
    scaled = pvalues[order] * (len(pvalues) - np.arange(len(pvalues)))
    adjusted = np.minimum(np.maximum.accumulate(scaled), 1.0)
    result = np.empty_like(adjusted)
    result[order] = adjusted
    return result


def blocks_by_parts(gains: pd.DataFrame, parts: list[str]) -> pd.DataFrame:
    """(seed, client) blocks x parts, complete rows only: the layout of Friedman's test."""
    wide = gains[gains["local_part"].isin(parts)].pivot_table(
        index=["seed", "client"], columns="local_part", values="gain", aggfunc="mean"
    )
    return wide.reindex(columns=parts).dropna()


def friedman(wide: pd.DataFrame) -> tuple[float, pd.Series]:
    """Friedman's p-value over the parts (columns), blocking on rows, and each part's mean rank
    (1 = the largest gain). NaN p with fewer than 3 parts or 2 blocks."""
    if wide.shape[1] < 1 or wide.shape[0] < 1:
        return math.nan, pd.Series(dtype=float)
    mean_rank = wide.rank(axis=1, ascending=False).mean()
    if wide.shape[1] < 3 or wide.shape[0] < 2:
        return math.nan, mean_rank
    result = stats.friedmanchisquare(*(wide[c].to_numpy() for c in wide.columns))
    return float(result.pvalue), mean_rank


def pairwise_wilcoxon(wide: pd.DataFrame) -> pd.DataFrame:
    """Every pair of parts: two-sided Wilcoxon signed-rank p on the paired blocks, and Holm-adjusted."""
    rows = []
    parts = list(wide.columns)
    for i, a in enumerate(parts):
        for b in parts[i + 1 :]:
            difference = (wide[a] - wide[b]).to_numpy()
            if len(difference) < 2 or not np.any(difference):
                p = 1.0
            else:
                p = float(stats.wilcoxon(difference, zero_method="zsplit").pvalue)
            rows.append(dict(a=a, b=b, p=p))
    table = pd.DataFrame(rows, columns=["a", "b", "p"])
    table["p_holm"] = holm(table["p"].to_numpy()) if len(table) else []
    return table


def adjacent_resolution(
    gains: pd.DataFrame, order: list[str], *, confidence: float = 0.95, draws: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """For each part in `order` (best first) against the next one: the hierarchical-bootstrap interval of
    their paired gain difference, `resolved_vs_next` when it excludes zero, and the Holm-adjusted Wilcoxon p."""
    wide = blocks_by_parts(gains, order)
    pairwise = pairwise_wilcoxon(wide)
    holm_p = {frozenset((r.a, r.b)): r.p_holm for r in pairwise.itertuples()}
    rows = []
    for upper, lower in zip(order, order[1:]):
        difference = seed_client_difference(gains, upper, lower)
        low, high = hierarchical_bootstrap(difference, draws=draws, confidence=confidence, seed=seed)
        rows.append(
            dict(
                part=upper,
                diff_low=low,
                diff_high=high,
                resolved_vs_next=bool(low > 0 or high < 0) if np.isfinite(low) else False,
                p_vs_next=holm_p.get(frozenset((upper, lower)), math.nan),
            )
        )
    return pd.DataFrame(rows, columns=["part", "diff_low", "diff_high", "resolved_vs_next", "p_vs_next"])


def seed_client_difference(gains: pd.DataFrame, a: str, b: str) -> np.ndarray:
    """Part a's gain minus part b's, paired per (seed, client), as seeds x clients."""
    both = gains[gains["local_part"].isin((a, b))].pivot_table(
        index=["seed", "client"], columns="local_part", values="gain", aggfunc="mean"
    )
    if a not in both or b not in both:
        return np.empty((0, 0))
    difference = (both[a] - both[b]).rename("gain").reset_index().assign(local_part="diff")
    return seed_client_matrix(difference, "diff")


def seed_halves(seeds: list[int]) -> tuple[list[int], list[int]]:
    """Two disjoint halves of the seeds (sorted; the first half takes the extra seed when odd)."""
    ordered = sorted(seeds)
    middle = (len(ordered) + 1) // 2
    return ordered[:middle], ordered[middle:]
