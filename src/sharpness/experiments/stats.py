"""Mean and 95% confidence interval over independent runs (seeds), as the SAM paper reports them."""

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
    """(mean, half-width of the 95% t-interval); the half-width is NaN for a single value."""
    if not values:
        raise ValueError("mean_ci95 needs at least one value")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, t_quantile_975(n - 1) * math.sqrt(variance / n)
