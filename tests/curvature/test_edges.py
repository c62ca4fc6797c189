"""Stability edges: the defining equations, the limits, bad input, and simulated quadratic dynamics at the edges."""

import math

import numpy as np
import pytest
import torch

from sharpness.curvature.edges import (
    adam_edge,
    gd_edge,
    momentum_edge,
    msam_edge,
    sam_edge,
    sam_edge_around,
    sam_edge_unnormalized,
    sgd_frobenius_bound,
)


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


# ----------------------------------------------------------------------------- optimizer-aware edges


def _final_norm(update, state: tuple, steps: int = 3000) -> float:
    """``||w||`` after ``steps`` iterations of ``state = update(*state)`` (``state[0]`` is ``w``), or the first
    value above 1e6 (diverged: stop before it overflows)."""
    for _ in range(steps):
        state = update(*state)
        if np.linalg.norm(state[0]) > 1e6:
            break
    return float(np.linalg.norm(state[0]))


def _sgd_final(lam: float, lr: float, steps: int, **options) -> float:
    """|x| after ``steps`` of torch.optim.SGD on L = ½ λ x² from x = 1 (the edge's definition, torch's update)."""
    x = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = torch.optim.SGD([x], lr=lr, **options)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * lam * x**2).sum().backward()
        opt.step()
        if abs(float(x.detach())) > 1e6:
            break
    return abs(float(x.detach()))


@pytest.mark.parametrize(
    "options",
    [
        {"momentum": 0.0},
        {"momentum": 0.9},
        {"momentum": 0.5, "dampening": 0.5},
        {"momentum": 0.9, "nesterov": True},
        {"momentum": 0.3, "nesterov": True},
    ],
)
def test_momentum_edge_separates_divergence_from_convergence_for_torch_sgd(options: dict) -> None:
    lr = 0.1
    edge = momentum_edge(lr, options["momentum"], dampening=options.get("dampening", 0.0),
                         nesterov=options.get("nesterov", False))  # fmt: skip
    assert _sgd_final(1.02 * edge, lr, 2000, **options) > 1e3
    assert _sgd_final(0.98 * edge, lr, 2000, **options) < 1e-3


def test_momentum_edge_closed_forms() -> None:
    assert momentum_edge(0.1, 0.0) == gd_edge(0.1)
    assert momentum_edge(0.1, 0.9) == pytest.approx(38.0, rel=1e-12)  # (2 + 2·0.9)/0.1
    assert momentum_edge(0.1, 0.9, dampening=0.9) == pytest.approx(380.0, rel=1e-12)
    assert momentum_edge(0.1, 0.9, nesterov=True) == pytest.approx(3.8 / 2.8 / 0.1, rel=1e-12)
    with pytest.raises(ValueError, match="dampening=0"):
        momentum_edge(0.1, 0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match="must be"):
        momentum_edge(0.1, 1.0)


def test_adam_edge_is_38_over_lr_and_separates_frozen_preconditioner_dynamics() -> None:
    """Adam with a frozen P on a 2-D quadratic (H not diagonal): stable iff λ_max(P⁻¹H) < (2 + 2β₁)/((1 − β₁)η)."""
    assert adam_edge(1e-3, 0.9) == pytest.approx(38_000.0, rel=1e-12)
    assert adam_edge(0.1, 0.0) == gd_edge(0.1)
    lr, beta1 = 0.01, 0.9
    p = np.array([0.3, 2.0])
    shape = np.array([[2.0, 0.7], [0.7, 1.0]])
    top = np.max(np.linalg.eigvals(shape / p[:, None]).real)  # λ_max(P⁻¹H) of the shape
    for factor, diverges in ((1.02, True), (0.98, False)):
        h = shape * factor * adam_edge(lr, beta1) / top

        def update(w, m, h=h):
            m = beta1 * m + (1 - beta1) * (h @ w)
            return w - lr * m / p, m

        final = _final_norm(update, (np.array([1.0, -0.5]), np.zeros(2)))
        assert final > 1e3 if diverges else final < 1e-3


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sam_edge_with_momentum_separates_frozen_gradient_norm_dynamics(momentum: float) -> None:
    """SAM around heavy-ball momentum, ||g|| frozen, exact update on a 2-D quadratic: v ← βv + H(w + ρHw/n)."""
    lr, rho, n = 0.05, 0.1, 0.5
    edge = sam_edge(lr, rho, n, momentum=momentum)
    assert lr * edge * (1 + rho * edge / n) == pytest.approx(2 + 2 * momentum, rel=1e-12)
    assert edge == pytest.approx((n / (2 * rho)) * (math.sqrt(1 + 4 * (2 + 2 * momentum) * rho / (lr * n)) - 1))
    for factor, diverges in ((1.02, True), (0.98, False)):
        h = np.diag([factor * edge, 0.3 * edge])

        def update(w, v, h=h):
            v = momentum * v + h @ (w + rho * (h @ w) / n)
            return w - lr * v, v

        final = _final_norm(update, (np.ones(2), np.zeros(2)))
        assert final > 1e3 if diverges else final < 1e-3


def test_sam_edge_with_momentum_limits() -> None:
    assert sam_edge(0.1, 0.0, 1.0, momentum=0.9) == momentum_edge(0.1, 0.9)
    assert sam_edge(0.1, 1e-13, 1.0, momentum=0.9) == pytest.approx(38.0, rel=1e-9)  # no cancellation
    assert sam_edge(0.1, 0.05, 1.0, momentum=0.9) < momentum_edge(0.1, 0.9)
    assert sam_edge_around(math.inf, 0.05, 1.0) == math.inf  # lr = 0
    assert sam_edge_around(momentum_edge(0.1, 0.9), 0.05, 2.0) == sam_edge(0.1, 0.05, 2.0, momentum=0.9)


@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_msam_edge_separates_frozen_momentum_norm_dynamics(dampening: float) -> None:
    """MSAM, ||v|| frozen: v ← βv + (1 − τ)H(w − ρv/n), w ← w − ηv on a 2-D quadratic."""
    lr, rho, n, beta = 0.05, 0.2, 3.0, 0.9
    edge = msam_edge(lr, rho, n, beta, dampening=dampening)
    assert edge == pytest.approx((2 + 2 * beta) / ((1 - dampening) * (lr + 2 * rho / n)), rel=1e-12)
    assert msam_edge(lr, rho, 0.0, beta) == momentum_edge(lr, beta)  # v = 0: no perturbation
    for factor, diverges in ((1.02, True), (0.98, False)):
        h = np.diag([factor * edge, 0.3 * edge])

        def update(w, v, h=h):
            v = beta * v + (1 - dampening) * h @ (w - rho * v / n)
            return w - lr * v, v

        final = _final_norm(update, (np.ones(2), np.zeros(2)))
        assert final > 1e3 if diverges else final < 1e-3
