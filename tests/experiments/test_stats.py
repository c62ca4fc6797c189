"""The 95% confidence interval against scipy's Student-t distribution; rank correlations against scipy."""

import math

import numpy as np
import pytest
from scipy import stats

from sharpness.experiments.stats import kendall_tau, mean_ci95, spearman, t_quantile_975


@pytest.mark.parametrize("df", [1, 2, 4, 9, 29, 30])
def test_t_quantiles_match_scipy(df: int) -> None:
    assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=6e-4)


@pytest.mark.parametrize("df", [31, 50, 200, 10_000])
def test_large_df_expansion_matches_scipy(df: int) -> None:
    assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-4)


def test_mean_ci95_matches_scipy_interval() -> None:
    values = [0.941, 0.947, 0.939, 0.952, 0.944]
    mean, half = mean_ci95(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=stats.tmean(values), scale=stats.sem(values))
    assert mean == pytest.approx((low + high) / 2)
    assert half == pytest.approx((high - low) / 2, rel=1e-3)


def test_single_value_and_errors() -> None:
    mean, half = mean_ci95([0.5])
    assert mean == 0.5 and math.isnan(half)
    with pytest.raises(ValueError):
        mean_ci95([])
    with pytest.raises(ValueError):
        t_quantile_975(0)


@pytest.mark.parametrize("ties", [False, True])
def test_rank_correlations_match_scipy(ties: bool) -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        a = rng.normal(size=9)
        b = a + rng.normal(size=9)
        if ties:  # rounding makes ties in both
            a, b = np.round(a), np.round(b)
        assert spearman(list(a), list(b)) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
        assert kendall_tau(list(a), list(b)) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)


def test_rank_correlation_edge_cases() -> None:
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1 and spearman([1, 2, 3], [10, 20, 30]) == 1
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1.0], [2.0]))
    with pytest.raises(ValueError, match="needs pairs: got 2 and 3"):
        kendall_tau([1, 2], [1, 2, 3])
