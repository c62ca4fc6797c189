"""SAM as implicit regularisation in least squares (Behdin & Mazumder, arXiv 2302.11836v2).

Model: ``y = X beta* + eps``, ``eps ~ N(0, sigma^2 I)``, ``f(beta) = (1/2n) ||y - X beta||^2``,
``Sigma_hat = X^T X / n`` with eigenpairs ``(lam_i, v_i)``.

Un-normalised SAM on least squares is exactly preconditioned GD (the gradient is affine, so the ascent step
``beta + rho grad f(beta)`` gives ``grad f(beta + rho g) = g + rho Sigma_hat g``)::

    beta_{k+1} = beta_k - eta grad f(beta_k + rho grad f(beta_k)) = beta_k - eta (I + rho Sigma_hat) grad f(beta_k).

From ``beta_0 = 0`` each eigendirection is shrunk by a spectral filter::

    GD:  phi_k(lam) = 1 - (1 - eta lam)^k          SAM: phi_k(lam) = 1 - (1 - eta lam (1 + rho lam))^k

and the in-sample risk ``E ||X(beta_k - beta*)||^2 / n = Bias_k + Var_k`` with::

    Bias_k = sum_i lam_i (1 - phi_k(lam_i))^2 <v_i, beta*>^2,      Var_k = (sigma^2 / n) sum_{lam_i > 0} phi_k(lam_i)^2.

Also here: the divergence threshold ``eta lam_max (1 + rho lam_max) > 2``, the kernel (RBF) version with the
eigenvalues of ``K/n``, the stochastic-SAM surrogate (same mini-batch for ascent and descent) and normalised SAM's
2-cycle along the top eigenvector. Everything is numpy float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "MonteCarloRisk",
    "bias_variance_closed_form",
    "critical_eta",
    "gd_filter",
    "kernel_signal_energy",
    "kernel_spectrum",
    "least_squares_grad",
    "normalized_sam_cycle_amplitude",
    "preconditioned_gd_step",
    "rbf_kernel",
    "sam_diverges",
    "sam_filter",
    "sam_stability_factor",
    "sam_step",
    "sample_stochastic_sam_directions",
    "signal_energy",
    "simulate_divergence",
    "simulate_kernel_risk",
    "simulate_normalized_sam",
    "simulate_risk",
    "spectral_decomposition",
    "spectral_filter",
    "stochastic_sam_surrogate",
    "stochastic_sam_surrogate_grad",
    "two_cycle_summary",
]


# ----------------------------------------------------------------------------------------------------------------------
# spectral filters and closed-form risk


def spectral_filter(lam: np.ndarray, k: int | np.ndarray, eta: float, rho: float = 0.0) -> np.ndarray:
    """``phi_k(lam) = 1 - (1 - eta lam (1 + rho lam))^k``; ``rho = 0`` is GD. Broadcasts over ``lam`` and ``k``.

    >>> import numpy as np
    >>> spectral_filter(np.array([1.0]), 2, eta=0.5)  # GD: 1 − (1 − ηλ)^k = 1 − 0.25
    array([0.75])
    """
    lam = np.asarray(lam, dtype=np.float64)
    k = np.asarray(k)
    return 1.0 - (1.0 - eta * lam * (1.0 + rho * lam)) ** k


def gd_filter(lam: np.ndarray, k: int | np.ndarray, eta: float) -> np.ndarray:
    """GD's filter ``phi_k(lam) = 1 - (1 - eta lam)^k`` (Behdin & Mazumder, Sec. 3)."""
    return spectral_filter(lam, k, eta, 0.0)


def sam_filter(lam: np.ndarray, k: int | np.ndarray, eta: float, rho: float) -> np.ndarray:
    """Un-normalised SAM's filter ``phi_k(lam) = 1 - (1 - eta lam (1 + rho lam))^k`` (Behdin & Mazumder, Sec. 3)."""
    return spectral_filter(lam, k, eta, rho)


def spectral_decomposition(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, clipped at 0) and eigenvectors (columns) of ``Sigma_hat = X^T X / n``."""
    n = X.shape[0]
    lam, V = np.linalg.eigh(X.T @ X / n)
    order = np.argsort(lam)[::-1]
    return np.clip(lam[order], 0.0, None), V[:, order]


def signal_energy(lam: np.ndarray, V: np.ndarray, beta_star: np.ndarray) -> np.ndarray:
    """``lam_i <v_i, beta*>^2``: the in-sample energy of the signal in eigendirection ``i`` (``Bias_0`` is its sum)."""
    return lam * (V.T @ beta_star) ** 2


def bias_variance_closed_form(
    lam: np.ndarray,
    energy: np.ndarray,
    eta: float,
    rho: float,
    sigma: float,
    n: int,
    ks: np.ndarray,
    tol: float = 1e-10,
) -> dict[str, np.ndarray]:
    """Closed-form in-sample bias, variance and risk at the steps ``ks`` from ``beta_0 = 0``.

    ``Bias_k = sum_i (1 - phi_k(lam_i))^2 energy_i`` with ``energy_i = lam_i <v_i, beta*>^2`` and
    ``Var_k = (sigma^2/n) sum_{lam_i > tol lam_max} phi_k(lam_i)^2``; ``rho = 0`` gives GD.
    """
    ks = np.asarray(ks)
    lam = np.asarray(lam, dtype=np.float64)
    phi = spectral_filter(lam[None, :], ks[:, None], eta, rho)
    bias = ((1.0 - phi) ** 2 * energy[None, :]).sum(axis=1)
    positive = lam > tol * max(lam.max(), 0.0)
    var = sigma**2 / n * (phi[:, positive] ** 2).sum(axis=1)
    return {"bias": bias, "var": var, "risk": bias + var}


# ----------------------------------------------------------------------------------------------------------------------
# the iterations


def least_squares_grad(X: np.ndarray, y: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """``grad f(beta) = X^T (X beta - y) / n``; ``beta`` and ``y`` may carry a trailing batch axis."""
    return X.T @ (X @ beta - y) / X.shape[0]


def sam_step(X: np.ndarray, y: np.ndarray, beta: np.ndarray, eta: float, rho: float) -> np.ndarray:
    """One un-normalised SAM step with the exact gradient at the ascent point: ``beta - eta grad f(beta + rho g)``."""
    g = least_squares_grad(X, y, beta)
    return beta - eta * least_squares_grad(X, y, beta + rho * g)


def preconditioned_gd_step(X: np.ndarray, y: np.ndarray, beta: np.ndarray, eta: float, rho: float) -> np.ndarray:
    """``beta - eta (I + rho Sigma_hat) grad f(beta)``, identical to :func:`sam_step` on least squares."""
    g = least_squares_grad(X, y, beta)
    return beta - eta * (g + rho * X.T @ (X @ g) / X.shape[0])


@dataclass
class MonteCarloRisk:
    """Monte-Carlo estimates over noise draws at steps ``0..n_steps`` with their standard errors.

    ``risk``: mean of ``||X(beta_k - beta*)||^2/n``; ``bias``: ``||X(mean beta_k - beta*)||^2/n`` minus its
    ``var/M`` finite-sample offset (unbiased); ``var``: mean of ``||X(beta_k - mean beta_k)||^2/n`` times ``M/(M-1)``.
    """

    risk: np.ndarray
    risk_se: np.ndarray
    bias: np.ndarray
    bias_se: np.ndarray
    var: np.ndarray
    var_se: np.ndarray

    def max_z(self, closed: dict[str, np.ndarray], floor: float = 1e-12) -> dict[str, float]:
        """Largest ``|simulated - closed| / SE`` over the steps, per part (the SE floored to ``floor``)."""
        out = {}
        for part in ("risk", "bias", "var"):
            est, se = getattr(self, part), getattr(self, part + "_se")
            out[part] = float(np.max(np.abs(est - closed[part]) / np.maximum(se, floor)))
        return out


def _summarise(pred_err: np.ndarray, pred_mean_err: np.ndarray, n: int) -> tuple[float, ...]:
    """Risk/bias/var estimates and SEs from in-sample errors ``X(beta_j - beta*)`` (n x M) and their mean (n)."""
    M = pred_err.shape[1]
    per_draw = (pred_err**2).sum(axis=0) / n
    centred = pred_err - pred_mean_err[:, None]
    w = (centred**2).sum(axis=0) / n
    var = w.mean() * M / (M - 1)
    var_se = w.std(ddof=1) / np.sqrt(M)
    bias = float((pred_mean_err**2).sum() / n - var / M)
    z = 2.0 * (pred_mean_err @ centred) / n  # linearisation of the bias estimate around the mean
    bias_se = np.sqrt(z.var(ddof=1) / M + 2.0 * (var / M) ** 2)
    return per_draw.mean(), per_draw.std(ddof=1) / np.sqrt(M), bias, bias_se, var, var_se


def _run_monte_carlo(step, F0: np.ndarray, F_star: np.ndarray, Y: np.ndarray, n_steps: int, to_pred) -> MonteCarloRisk:
    rows = []
    B = F0
    for k in range(n_steps + 1):
        if k > 0:
            B = step(B, Y)
        err = to_pred(B) - F_star[:, None]
        rows.append(_summarise(err, err.mean(axis=1), F_star.shape[0]))
    arr = np.array(rows, dtype=np.float64)
    return MonteCarloRisk(*(arr[:, j] for j in range(6)))


def simulate_risk(
    X: np.ndarray,
    beta_star: np.ndarray,
    sigma: float,
    eta: float,
    rho: float,
    n_steps: int,
    n_draws: int,
    rng: np.random.Generator,
) -> MonteCarloRisk:
    """Run GD (``rho = 0``) or un-normalised SAM from ``beta_0 = 0`` on ``n_draws`` noise draws (fixed design ``X``).

    SAM is run literally (gradient at ``beta + rho grad f(beta)``), not through the preconditioned form.
    """
    n, d = X.shape
    Y = (X @ beta_star)[:, None] + sigma * rng.standard_normal((n, n_draws))

    def step(B, Y):
        return sam_step(X, Y, B, eta, rho) if rho else B - eta * least_squares_grad(X, Y, B)

    return _run_monte_carlo(step, np.zeros((d, n_draws)), X @ beta_star, Y, n_steps, lambda B: X @ B)


# ----------------------------------------------------------------------------------------------------------------------
# divergence


def sam_stability_factor(lam_max: float, eta: float, rho: float) -> float:
    """``eta lam_max (1 + rho lam_max)``; SAM (from a generic start) diverges iff it exceeds 2."""
    return float(eta * lam_max * (1.0 + rho * lam_max))


def sam_diverges(lam_max: float, eta: float, rho: float) -> bool:
    """Whether un-normalised SAM on least squares diverges: ``eta lam_max (1 + rho lam_max) > 2``."""
    return sam_stability_factor(lam_max, eta, rho) > 2.0


def critical_eta(lam_max: float, rho: float) -> float:
    """The step size at the threshold: ``eta_c = 2 / (lam_max (1 + rho lam_max))`` (``rho = 0``: GD's ``2/lam``).

    >>> critical_eta(2.0, 0.5)  # 2 / (λ (1 + ρλ)) = 2 / (2 · 2)
    0.5
    >>> sam_diverges(2.0, 0.51, 0.5), sam_diverges(2.0, 0.49, 0.5)
    (True, False)
    """
    return 2.0 / (lam_max * (1.0 + rho * lam_max))


def simulate_divergence(
    X: np.ndarray, y: np.ndarray, eta: float, rho: float, n_steps: int, beta0: np.ndarray | None = None
) -> np.ndarray:
    """``||beta_k - beta_hat||`` for ``k = 0..n_steps`` of SAM (``beta_hat``: the min-norm least-squares solution)."""
    beta_hat = np.linalg.lstsq(X, y, rcond=None)[0]
    beta = np.zeros(X.shape[1]) if beta0 is None else beta0.astype(np.float64)
    errs = [np.linalg.norm(beta - beta_hat)]
    for _ in range(n_steps):
        beta = sam_step(X, y, beta, eta, rho)
        errs.append(np.linalg.norm(beta - beta_hat))
    return np.array(errs)


# ----------------------------------------------------------------------------------------------------------------------
# kernel regression


def rbf_kernel(x: np.ndarray, lengthscale: float) -> np.ndarray:
    """``K_ij = exp(-||x_i - x_j||^2 / (2 l^2))`` for points ``x`` of shape (n, p)."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=-1)
    return np.exp(-sq / (2.0 * lengthscale**2))


def kernel_spectrum(K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, clipped at 0) and eigenvectors of ``K / n``.

    With features ``Phi`` (``K = Phi Phi^T``) the non-zero eigenvalues of ``K/n`` are those of ``Phi^T Phi / n``.
    """
    n = K.shape[0]
    mu, U = np.linalg.eigh(K / n)
    order = np.argsort(mu)[::-1]
    return np.clip(mu[order], 0.0, None), U[:, order]


def kernel_signal_energy(U: np.ndarray, f_star: np.ndarray) -> np.ndarray:
    """``<u_i, f*>^2 / n`` (equals ``mu_i <v_i, beta*>^2`` when ``f* = Phi beta*``)."""
    return (U.T @ f_star) ** 2 / U.shape[0]


def simulate_kernel_risk(
    K: np.ndarray,
    f_star: np.ndarray,
    sigma: float,
    eta: float,
    rho: float,
    n_steps: int,
    n_draws: int,
    rng: np.random.Generator,
) -> MonteCarloRisk:
    """Ridge-less kernel regression by GD/SAM in function space from ``F_0 = 0``.

    GD in the RKHS gives in-sample predictions ``F_{k+1} = F_k - eta (K/n)(F_k - y)``; SAM (ascent point
    ``F + rho (K/n)(F - y)``) gives ``F_{k+1} = F_k - eta (K/n)(F_k + rho (K/n)(F_k - y) - y)``.
    """
    n = K.shape[0]
    Kn = K / n
    Y = f_star[:, None] + sigma * rng.standard_normal((n, n_draws))

    def step(F, Y):
        ascent = F + rho * Kn @ (F - Y)
        return F - eta * Kn @ (ascent - Y)

    return _run_monte_carlo(step, np.zeros((n, n_draws)), f_star, Y, n_steps, lambda F: F)


# ----------------------------------------------------------------------------------------------------------------------
# stochastic SAM


def stochastic_sam_surrogate(X: np.ndarray, y: np.ndarray, beta: np.ndarray, rho: float, batch: int) -> float:
    """``f + (rho/2)(1 - 1/B) ||grad f||^2 + (rho/B)(1/2n) sum_i ||x_i||^2 r_i^2`` with ``r_i = x_i^T beta - y_i``.

    Its gradient is the mean stochastic-SAM direction when the same batch (``B`` indices drawn uniformly with
    replacement) is used for the ascent and the descent gradient.
    """
    n = X.shape[0]
    r = X @ beta - y
    g = X.T @ r / n
    return float(
        r @ r / (2 * n) + rho / 2 * (1 - 1 / batch) * g @ g + rho / batch / (2 * n) * ((X**2).sum(1) * r**2).sum()
    )


def stochastic_sam_surrogate_grad(X: np.ndarray, y: np.ndarray, beta: np.ndarray, rho: float, batch: int) -> np.ndarray:
    """``grad f + rho (1 - 1/B) Sigma_hat grad f + (rho/B)(1/n) sum_i ||x_i||^2 r_i x_i``."""
    n = X.shape[0]
    r = X @ beta - y
    g = X.T @ r / n
    return g + rho * (1 - 1 / batch) * X.T @ (X @ g) / n + rho / batch * X.T @ ((X**2).sum(1) * r) / n


def sample_stochastic_sam_directions(
    X: np.ndarray,
    y: np.ndarray,
    beta: np.ndarray,
    rho: float,
    batch: int,
    n_samples: int,
    rng: np.random.Generator,
    chunk: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and per-coordinate SE of ``grad f_S(beta + rho grad f_S(beta))`` over sampled batches ``S``.

    ``S``: ``batch`` indices uniform with replacement; ``f_S = (1/2B) sum_{i in S} (y_i - x_i^T beta)^2``. The SAM
    update is ``beta - eta`` times this direction.
    """
    n, d = X.shape
    total = np.zeros(d)
    total_sq = np.zeros(d)
    done = 0
    while done < n_samples:
        m = min(chunk, n_samples - done)
        idx = rng.integers(0, n, size=(m, batch))
        Xs, ys = X[idx], y[idx]  # (m, B, d), (m, B)
        g = np.einsum("mbd,mb->md", Xs, Xs @ beta - ys) / batch
        ascent = beta[None, :] + rho * g
        r = np.einsum("mbd,md->mb", Xs, ascent) - ys
        direction = np.einsum("mbd,mb->md", Xs, r) / batch
        total += direction.sum(0)
        total_sq += (direction**2).sum(0)
        done += m
    mean = total / n_samples
    var = (total_sq / n_samples - mean**2) * n_samples / (n_samples - 1)
    return mean, np.sqrt(np.maximum(var, 0.0) / n_samples)


# ----------------------------------------------------------------------------------------------------------------------
# normalised SAM


def simulate_normalized_sam(
    X: np.ndarray, y: np.ndarray, beta0: np.ndarray, eta: float, rho: float, n_steps: int
) -> np.ndarray:
    """Iterates of normalised SAM ``beta - eta grad f(beta + rho g/||g||)``, shape (n_steps + 1, d)."""
    beta = beta0.astype(np.float64)
    out = [beta.copy()]
    for _ in range(n_steps):
        g = least_squares_grad(X, y, beta)
        norm = np.linalg.norm(g)
        ascent = beta + (rho * g / norm if norm > 0 else 0.0)
        beta = beta - eta * least_squares_grad(X, y, ascent)
        out.append(beta.copy())
    return np.array(out)


def normalized_sam_cycle_amplitude(lam_max: float, eta: float, rho: float) -> float:
    """Half-width of the 2-cycle ``beta_hat +- a v_1``: ``a = eta rho lam / (2 - eta lam)``.

    From ``e_{k+1} = (1 - eta lam) e_k - eta rho lam sign(e_k)`` along ``v_1`` with ``e_{k+1} = -e_k``.
    """
    return float(eta * rho * lam_max / (2.0 - eta * lam_max))


def two_cycle_summary(iterates: np.ndarray, v1: np.ndarray, centre: np.ndarray, burn_in: int) -> dict[str, float]:
    """After ``burn_in``: min ``|cos|`` of ``beta_{k+1} - beta_k`` with ``v_1``, the cycle's half-amplitude, and the
    relative period-2 residual ``max ||beta_{k+2} - beta_k|| / mean ||beta_{k+1} - beta_k||``."""
    tail = iterates[burn_in:]
    diffs = np.diff(tail, axis=0)
    norms = np.linalg.norm(diffs, axis=1)
    cos = np.abs(diffs @ v1) / np.maximum(norms, 1e-300)
    period2 = np.linalg.norm(tail[2:] - tail[:-2], axis=1)
    proj = (tail - centre) @ v1
    return {
        "min_abs_cos_v1": float(cos.min()),
        "half_amplitude": float(np.mean(np.abs(proj))),
        "mean_step_norm": float(norms.mean()),
        "period2_residual": float(period2.max() / norms.mean()),
        "alternates": bool(np.all(proj[1:] * proj[:-1] < 0)),
    }
