"""Closed-form theory of SAM on least squares (Behdin & Mazumder, arXiv 2302.11836v2) against direct computation."""

import json

import numpy as np
import pytest
import torch

from sharpness.theory import least_squares as ls


@pytest.fixture
def problem():
    rng = np.random.default_rng(1)
    n, d = 30, 12
    X = rng.standard_normal((n, d)) * np.linspace(2.0, 0.3, d)  # Sigma_hat with lam_max > 1, so lam^2 != lam
    beta_star = rng.standard_normal(d)
    y = X @ beta_star + 0.3 * rng.standard_normal(n)
    return X, y, beta_star


def test_filters_by_hand():
    # independent numbers: eta=0.1, lam=2, rho=0.5 -> SAM contraction 1 - 0.1*2*(1+1) = 0.6, GD 1 - 0.2 = 0.8
    assert ls.sam_filter(2.0, 3, 0.1, 0.5) == pytest.approx(1 - 0.6**3, abs=1e-15)
    assert ls.gd_filter(2.0, 3, 0.1) == pytest.approx(1 - 0.8**3, abs=1e-15)
    assert ls.sam_filter(2.0, 0, 0.1, 0.5) == 0.0


@pytest.mark.parametrize("rho", [0.0, 0.7])
def test_iterates_from_zero_match_filter(problem, rho):
    X, y, _ = problem
    n = X.shape[0]
    lam, V = ls.spectral_decomposition(X)
    eta = 0.9 / (lam[0] * (1 + rho * lam[0]))
    beta = np.zeros(X.shape[1])
    coef = V.T @ (X.T @ y / n) / lam  # <v_i, beta_hat>, full column rank here
    for k in range(1, 41):
        beta = ls.sam_step(X, y, beta, eta, rho) if rho else beta - eta * ls.least_squares_grad(X, y, beta)
        predicted = V @ (ls.spectral_filter(lam, k, eta, rho) * coef)
        np.testing.assert_allclose(beta, predicted, atol=1e-10, rtol=0)


def test_closed_form_bias_and_variance_match_exact_moments(problem):
    X, _, beta_star = problem
    n, d = X.shape
    eta, rho, sigma, k = 0.05, 0.4, 0.7, 9
    S = X.T @ X / n
    # beta_k = A_k X^T y / n with the exact matrix recursion A_{k+1} = A_k + eta (I + rho S)(I - S A_k)
    A = np.zeros((d, d))
    for _ in range(k):
        A = A + eta * (np.eye(d) + rho * S) @ (np.eye(d) - S @ A)
    H = X @ A @ X.T / n  # in-sample hat matrix: X beta_k = H y
    bias = np.sum((H @ X @ beta_star - X @ beta_star) ** 2) / n
    var = sigma**2 * np.trace(H @ H.T) / n
    lam, V = ls.spectral_decomposition(X)
    closed = ls.bias_variance_closed_form(lam, ls.signal_energy(lam, V, beta_star), eta, rho, sigma, n, np.array([k]))
    assert closed["bias"][0] == pytest.approx(bias, rel=1e-10)
    assert closed["var"][0] == pytest.approx(var, rel=1e-10)
    assert closed["risk"][0] == pytest.approx(bias + var, rel=1e-10)


def test_sam_is_preconditioned_gd(problem):
    X, y, _ = problem
    rng = np.random.default_rng(2)
    for _ in range(5):
        beta = rng.standard_normal(X.shape[1])
        a = ls.sam_step(X, y, beta, 0.03, 0.8)
        b = ls.preconditioned_gd_step(X, y, beta, 0.03, 0.8)
        np.testing.assert_allclose(a, b, atol=1e-12, rtol=0)


def test_divergence_threshold():
    assert ls.sam_stability_factor(2.0, 0.1, 0.5) == pytest.approx(0.4)  # 0.1 * 2 * (1 + 0.5*2)
    assert ls.critical_eta(2.0, 0.5) == pytest.approx(0.5)
    assert not ls.sam_diverges(2.0, 0.499, 0.5)
    assert ls.sam_diverges(2.0, 0.501, 0.5)
    assert ls.critical_eta(2.0, 0.0) == pytest.approx(1.0)  # GD: 2 / lam


def test_divergence_simulation(problem):
    X, _, beta_star = problem
    y = X @ beta_star
    lam, _ = ls.spectral_decomposition(X)
    eta_c = ls.critical_eta(lam[0], 0.5)
    below = ls.simulate_divergence(X, y, 0.97 * eta_c, 0.5, 400)
    above = ls.simulate_divergence(X, y, 1.03 * eta_c, 0.5, 400)
    assert below[-1] < 0.1 * below[0] and np.all(np.diff(below[100:]) < 1e-12)
    assert above[-1] > 1e3 * above[0]


def test_surrogate_gradient_matches_autograd(problem):
    X, y, _ = problem
    rho, batch = 0.6, 3
    beta = np.random.default_rng(3).standard_normal(X.shape[1])
    Xt, yt = torch.tensor(X), torch.tensor(y)
    bt = torch.tensor(beta, requires_grad=True)
    n = X.shape[0]
    r = Xt @ bt - yt
    g = Xt.T @ r / n
    value = r @ r / (2 * n) + rho / 2 * (1 - 1 / batch) * g @ g + rho / batch / (2 * n) * ((Xt**2).sum(1) * r**2).sum()
    value.backward()
    np.testing.assert_allclose(ls.stochastic_sam_surrogate_grad(X, y, beta, rho, batch), bt.grad.numpy(), rtol=1e-12)
    assert ls.stochastic_sam_surrogate(X, y, beta, rho, batch) == pytest.approx(value.item(), rel=1e-12)


def test_stochastic_sam_mean_direction(problem):
    X, y, _ = problem
    beta = np.zeros(X.shape[1])
    mean, se = ls.sample_stochastic_sam_directions(X, y, beta, 0.5, 2, 60_000, np.random.default_rng(4))
    target = ls.stochastic_sam_surrogate_grad(X, y, beta, 0.5, 2)
    assert np.max(np.abs(mean - target) / se) < 4.5


def test_normalized_sam_two_cycle(problem):
    X, y, _ = problem
    lam, V = ls.spectral_decomposition(X)
    eta, rho = 0.5 / lam[0], 0.05
    iterates = ls.simulate_normalized_sam(X, y, np.zeros(X.shape[1]), eta, rho, 3000)
    beta_hat = np.linalg.lstsq(X, y, rcond=None)[0]
    summary = ls.two_cycle_summary(iterates, V[:, 0], beta_hat, 2500)
    assert summary["min_abs_cos_v1"] > 0.99 and summary["alternates"]
    assert summary["half_amplitude"] == pytest.approx(ls.normalized_sam_cycle_amplitude(lam[0], eta, rho), rel=1e-6)


def test_kernel_spectrum_matches_features():
    rng = np.random.default_rng(5)
    Phi = rng.standard_normal((20, 6))
    mu, _ = ls.kernel_spectrum(Phi @ Phi.T)
    lam, _ = ls.spectral_decomposition(Phi)
    np.testing.assert_allclose(mu[:6], lam, rtol=1e-10)
    K = ls.rbf_kernel(rng.uniform(size=(7, 2)), 0.3)
    assert np.allclose(np.diag(K), 1.0) and np.allclose(K, K.T)


def test_reproduction_quick(tmp_path):
    from sharpness.reproductions.least_squares import run

    result = run(tmp_path, quick=True, seed=0)
    assert result.name == "least-squares"
    assert len(result.checks) == 8
    assert result.passed, [c for c in result.checks if not c.passed]
    assert result.figures and all(p.exists() and p.suffix == ".png" for p in result.figures)
    json.dumps(result.numbers)
    json.dumps(result.settings)
