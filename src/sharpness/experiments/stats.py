"""Statistics of experiments: mean and 95% confidence interval over seeds (as the SAM paper reports them) and rank
correlations (Spearman ρ, Kendall τ_b) for trends across runs."""

from __future__ import annotations

import math
from collections.abc import Sequence

# Two-sided 95% quantiles t_{0.975, df} of Student's t distribution, df = 1..30 (standard table values).
_T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z_975 = 1.959964


def t_quantile_975(df: int) -> float:
    """``t_{0.975, df}``: the table for df <= 30, beyond it the Cornish–Fisher expansion in 1/df around the
    normal quantile (Abramowitz & Stegun 26.7.5), accurate to about 1e-4 there."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T_975):
        return _T_975[df - 1]
    z = _Z_975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); the half-width is NaN for a single value.

    >>> mean, half_width = mean_ci95([1.0, 2.0, 3.0])
    >>> mean, round(half_width, 4)  # t_{0.975,2} = 4.303 times the standard error 1/√3
    (2.0, 2.4843)
    """
    if not values:
        raise ValueError("mean_ci95 needs at least one value")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, t_quantile_975(n - 1) * math.sqrt(variance / n)


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _pearson(a: Sequence[float], b: Sequence[float]) -> float:
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b, strict=True))
    var_a = sum((x - mean_a) ** 2 for x in a)
    var_b = sum((y - mean_b) ** 2 for y in b)
    return cov / math.sqrt(var_a * var_b) if var_a > 0 and var_b > 0 else math.nan


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[list[float], list[float]]:
    if len(a) != len(b):
        raise ValueError(f"a rank correlation needs pairs: got {len(a)} and {len(b)} values")
    return [float(v) for v in a], [float(v) for v in b]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the (tie-averaged) ranks; NaN if either is constant or
    there are fewer than 2 pairs.

    >>> spearman([1, 2, 3], [3, 1, 2])
    -0.5
    """
    a, b = _paired(a, b)
    return _pearson(_ranks(a), _ranks(b)) if len(a) >= 2 else math.nan


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's τ_b: ``(C − D) / sqrt((P − T_a)(P − T_b))`` over the ``P = n(n−1)/2`` pairs, ``C``/``D`` the
    concordant/discordant pairs and ``T_a``/``T_b`` the pairs tied in ``a``/``b``; NaN if either is constant.

    >>> kendall_tau([1, 2, 3, 4], [10, 20, 40, 30])  # 5 concordant pairs, 1 discordant, of 6
    0.6666666666666666
    """
    a, b = _paired(a, b)
    concordant = discordant = tied_a = tied_b = pairs = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            pairs += 1
            sign = (a[i] > a[j]) - (a[i] < a[j]), (b[i] > b[j]) - (b[i] < b[j])
            tied_a += sign[0] == 0
            tied_b += sign[1] == 0
            concordant += sign[0] * sign[1] > 0
            discordant += sign[0] * sign[1] < 0
    denominator = math.sqrt((pairs - tied_a) * (pairs - tied_b))
    return (concordant - discordant) / denominator if denominator > 0 else math.nan
