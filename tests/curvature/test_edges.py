"""Stability edges: the defining equations, the limits, and bad input."""

import math

import pytest

from sharpness.curvature.edges import gd_edge, sam_edge, sam_edge_unnormalized, sgd_frobenius_bound


@pytest.mark.parametrize("lr, rho, g", [(0.1, 0.05, 1.0), (0.01, 0.5, 0.02), (2.0, 1e-3, 30.0)])
def test_sam_edge_solves_its_equation_and_lies_below_2_over_lr(lr: float, rho: float, g: float) -> None:
    lam = sam_edge(lr, rho, g)
    assert lr * lam * (1 + rho * lam / g) == pytest.approx(2.0, rel=1e-12)
    assert lam < gd_edge(lr)
    closed_form = (g / (2 * rho)) * (math.sqrt(1 + 8 * rho / (lr * g)) - 1)  # papers.md §5, as written
    assert lam == pytest.approx(closed_form, rel=1e-9)


def test_sam_edge_limits() -> None:
    assert sam_edge(0.1, 0.0, 1.0) == gd_edge(0.1) == 20.0
    assert sam_edge(0.1, 1e-12, 1.0) == pytest.approx(20.0, rel=1e-9)  # no cancellation for tiny rho
    assert sam_edge(0.1, 0.05, 1e9) == pytest.approx(20.0, rel=1e-6)  # rho/||g|| -> 0
    assert sam_edge(0.1, 0.05, 0.1) < sam_edge(0.1, 0.05, 1.0) < sam_edge(0.1, 0.05, 10.0)  # grows with ||g||


def test_unnormalized_sam_edge() -> None:
    lam = sam_edge_unnormalized(0.1, 0.2)
    assert 0.1 * lam * (1 + 0.2 * lam) == pytest.approx(2.0, rel=1e-12)
    assert lam == pytest.approx((math.sqrt(1 + 8 * 0.2 / 0.1) - 1) / (2 * 0.2), rel=1e-12)
    assert sam_edge_unnormalized(0.1, 0.0) == 20.0


def test_sgd_frobenius_bound() -> None:
    assert sgd_frobenius_bound(0.1, 16, 4.0) == pytest.approx(math.sqrt(16 / 4.0) / 0.1)
    assert sgd_frobenius_bound(0.1, 64, 1.0) == 2 * sgd_frobenius_bound(0.1, 16, 1.0)  # grows like sqrt(B)


@pytest.mark.parametrize(
    "call",
    [
        lambda: gd_edge(0.0),
        lambda: gd_edge(-1.0),
        lambda: sam_edge(0.1, -0.1, 1.0),
        lambda: sam_edge(0.1, 0.1, 0.0),
        lambda: sam_edge(math.nan, 0.1, 1.0),
        lambda: sgd_frobenius_bound(0.1, 0, 1.0),
        lambda: sgd_frobenius_bound(0.1, 8, 0.0),
    ],
)
def test_bad_input(call) -> None:
    with pytest.raises(ValueError, match="must be"):
        call()
