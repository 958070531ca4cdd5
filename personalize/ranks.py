"""Rank statistics between two scores of the same parts (aligned on their index): their one home."""

from __future__ import annotations

import math

import pandas as pd
from scipy import stats


def spearman(x: pd.Series, y: pd.Series) -> float:
    """Spearman correlation over the index labels where both are known (the series are aligned on their
    index, e.g. part names); NaN below 3 of them or for a constant: fewer than 3 parts say nothing about an order."""
    both = pd.concat([x, y], axis=1).dropna()
    if len(both) < 3 or both.iloc[:, 0].nunique() < 2 or both.iloc[:, 1].nunique() < 2:
        return math.nan
    return float(stats.spearmanr(both.iloc[:, 0], both.iloc[:, 1]).statistic)


def kendall_tau(a: pd.Series, b: pd.Series) -> float:
    """Kendall's tau between two scores over the parts both know; NaN below 2 parts or for a constant."""
    both = pd.concat([a, b], axis=1).dropna()
    if len(both) < 2 or both.iloc[:, 0].nunique() < 2 or both.iloc[:, 1].nunique() < 2:
        return math.nan
    return float(stats.kendalltau(both.iloc[:, 0], both.iloc[:, 1]).statistic)
