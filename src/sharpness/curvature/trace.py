"""Stochastic estimates of ``tr(A)`` and ``‖A‖_F`` of a symmetric operator from matrix-vector products.

- :func:`hutchinson_trace`: ``tr(A) = E[vᵀ A v]`` over random probes with ``E[v vᵀ] = I``.
- :func:`hutchpp_trace`: Hutch++, which takes the top of the spectrum exactly from a sketch and applies
  Hutchinson to the rest; far more accurate for a matrix with a few large eigenvalues (a Hessian).
- :func:`frobenius_norm`: ``‖A‖_F² = tr(A²) = E‖A v‖²`` for Rademacher ``v`` (Hutchinson on ``A²``).

Each returns the estimate with a standard error (sample standard deviation over ``sqrt(m)``), so a report can
say ``value ± 2 stderr``, and the number of products used. Each takes ``num_matvecs``, its budget of products
(one per probe for Hutchinson and the Frobenius norm; ``num_samples`` there is a deprecated alias).

References: M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
smoothing splines", Comm. Stat. Simul. Comput. 18 (1989); H. Avron & S. Toledo, "Randomized algorithms for
estimating the trace of an implicit symmetric positive semi-definite matrix", J. ACM 58 (2011);
R. A. Meyer, C. Musco, C. Musco & D. P. Woodruff, "Hutch++: Optimal stochastic trace estimation", SOSA 2021.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sharpness._deprecation import renamed_arguments, renamed_attribute
from sharpness.checks import check_integer
from sharpness.curvature.linop import LinearOperator, apply_block, counting, default_generator, gaussian, rademacher

__all__ = ["TraceEstimate", "FrobeniusEstimate", "hutchinson_trace", "hutchpp_trace", "frobenius_norm"]


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate.

    Attributes:
        value: the estimate of ``tr(A)``.
        stderr: its standard error, ``std(samples, ddof=1) / sqrt(num_probes)`` (``nan`` for one probe). For
            Hutch++ it is that of the Hutchinson part, conditional on the sketch (the exact part has none).
        num_probes: the number of random quadratic forms ``vᵀ A v`` averaged (Hutchinson: ``num_matvecs``;
            Hutch++: the probes left after the sketch and its basis). ``num_samples`` is a deprecated alias.
        num_matvecs: products with the operator used.
    """

    value: float
    stderr: float
    num_probes: int
    num_matvecs: int

    num_samples = renamed_attribute("num_samples", "num_probes")


@dataclass(frozen=True)
class FrobeniusEstimate:
    """A Frobenius-norm estimate.

    Attributes:
        value: the estimate of ``‖A‖_F``, ``sqrt(squared)``.
        stderr: its standard error by the delta method, ``squared_stderr / (2 value)``.
        squared: the (unbiased) estimate of ``‖A‖_F² = tr(A²)``, the mean of ``‖A v‖²``.
        squared_stderr: the standard error of ``squared``.
        num_probes: the number of probes ``v`` averaged (one product each, so ``num_matvecs``). ``num_samples``
            is a deprecated alias.
        num_matvecs: products with the operator used.
    """

    value: float
    stderr: float
    squared: float
    squared_stderr: float
    num_probes: int
    num_matvecs: int

    num_samples = renamed_attribute("num_samples", "num_probes")


def _mean_stderr(samples: list[float]) -> tuple[float, float]:
    x = torch.tensor(samples, dtype=torch.float64)
    mean = float(x.mean())
    if len(samples) < 2:
        return mean, math.nan
    return mean, float(x.std(correction=1)) / math.sqrt(len(samples))


def _probe(distribution: str, op: LinearOperator, generator: torch.Generator) -> Tensor:
    draw = rademacher if distribution == "rademacher" else gaussian
    return draw(op.dim, dtype=op.dtype, device=op.device, generator=generator)


def _rademacher_block(n: int, count: int, op: LinearOperator, generator: torch.Generator) -> Tensor:
    """``count`` Rademacher vectors as the columns of an ``(n, count)`` block, drawn one after another."""
    return torch.stack([rademacher(n, dtype=op.dtype, device=op.device, generator=generator) for _ in range(count)], 1)


@renamed_arguments(num_samples="num_matvecs")
def hutchinson_trace(
    op: LinearOperator,
    num_matvecs: int = 100,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
) -> TraceEstimate:
    """Hutchinson's estimate of ``tr(A)``: the mean of ``vᵀ A v`` over independent random probes ``v``.

    Method: ``E[vᵀ A v] = tr(A E[v vᵀ]) = tr(A)`` when ``E[v vᵀ] = I``. Rademacher probes (entries ±1) have the
    smallest variance, ``2 (‖A‖_F² − Σ_i A_ii²)``; Gaussian probes have ``2 ‖A‖_F²``. Uses ``num_matvecs``
    products, one per probe; the standard error is the sample standard deviation over ``sqrt(num_matvecs)``.

    Args:
        op: a symmetric :class:`~sharpness.curvature.linop.LinearOperator`.
        num_matvecs: number of products, ``>= 1``: one per probe (the standard error needs ``>= 2``).
            Deprecated alias: ``num_samples``.
        distribution: ``"rademacher"`` or ``"gaussian"``.
        generator: source of the probes; default a fresh generator seeded 0 (the global RNG is never used).

    References: Hutchinson (1989); Avron & Toledo (2011).
    """
    op = counting(op)
    num_matvecs = check_integer(num_matvecs, "num_matvecs", low=1)
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    generator = default_generator(generator)
    samples = []
    for _ in range(num_matvecs):
        v = _probe(distribution, op, generator)
        samples.append(float(torch.dot(v, op.matvec(v))))
    value, stderr = _mean_stderr(samples)
    return TraceEstimate(value=value, stderr=stderr, num_probes=num_matvecs, num_matvecs=op.num_matvecs)


def hutchpp_trace(
    op: LinearOperator,
    num_matvecs: int = 99,
    *,
    generator: torch.Generator | None = None,
) -> TraceEstimate:
    """Hutch++ estimate of ``tr(A)`` with a budget of ``num_matvecs`` products (Meyer et al. 2021, Algorithm 1).

    Method: split the budget in three. Draw a Rademacher sketch ``S`` with ``s = num_matvecs // 3`` columns and
    take an orthonormal basis ``Q`` of ``A S`` (``s`` products, QR); then ``tr(A) = tr(Qᵀ A Q) + tr((I − QQᵀ) A
    (I − QQᵀ))``, the first term exactly (``s`` products) and the second by Hutchinson with the remaining
    ``num_matvecs − 2 s`` (``>= s``) Rademacher probes ``g`` projected as ``(I − QQᵀ) g``. The sketch captures the
    large eigenvalues, so the Hutchinson part only sees the deflated rest: error ``O(1/m)`` instead of
    ``O(1/sqrt(m))`` for a positive semi-definite ``A``. The standard error is that of the Hutchinson part,
    conditional on ``Q``. If ``s > n`` the basis has ``n`` columns, the first term is ``tr(A)`` exactly and the
    unused products go to the probes.

    Products come in three blocks through :func:`~sharpness.curvature.linop.apply_block`: ``A S``, ``A Q`` and
    ``A G`` for the projected probes ``G`` (one batched call each when the operator has ``matmat``, the same
    ``num_matvecs`` either way; the random vectors are drawn in the same order as one at a time, so the estimate
    equals the column-by-column one up to rounding). Memory: a few ``n × s`` blocks of the operator's dtype.

    Args:
        op: a symmetric :class:`~sharpness.curvature.linop.LinearOperator`.
        num_matvecs: the budget of products, ``>= 3``.
        generator: source of the sketch and probes; default a fresh generator seeded 0.

    Reference: Meyer, Musco, Musco & Woodruff, "Hutch++: Optimal stochastic trace estimation", SOSA 2021, Alg. 1.
    """
    op = counting(op)
    num_matvecs = check_integer(num_matvecs, "num_matvecs", low=3)
    generator = default_generator(generator)
    n = op.dim
    s = num_matvecs // 3
    sketch = apply_block(op, _rademacher_block(n, s, op, generator))  # A S
    q, _ = torch.linalg.qr(sketch, mode="reduced")  # (n, min(n, s)), orthonormal even if A S is rank deficient
    del sketch
    r = q.shape[1]
    num_probes = num_matvecs - s - r
    exact = float((q * apply_block(op, q)).sum())  # tr(Qᵀ A Q)
    g = _rademacher_block(n, num_probes, op, generator)  # num_probes >= s >= 1
    g = g - q @ (q.T @ g)
    rest, stderr = _mean_stderr((g * apply_block(op, g)).sum(dim=0).tolist())
    return TraceEstimate(value=exact + rest, stderr=stderr, num_probes=num_probes, num_matvecs=op.num_matvecs)


@renamed_arguments(num_samples="num_matvecs")
def frobenius_norm(
    op: LinearOperator,
    num_matvecs: int = 100,
    *,
    generator: torch.Generator | None = None,
) -> FrobeniusEstimate:
    """Estimate ``‖A‖_F`` as ``sqrt(mean ‖A v‖²)`` over Rademacher probes ``v`` (Hutchinson on ``A²``).

    Method: for symmetric ``A``, ``E‖A v‖² = E[vᵀ A² v] = tr(A²) = ‖A‖_F²`` when ``E[v vᵀ] = I``; one product per
    probe. ``squared`` is unbiased with standard error ``std / sqrt(m)``; ``value = sqrt(squared)`` is slightly
    biased low (Jensen) and its standard error is ``squared_stderr / (2 value)`` by the delta method. For a
    Hessian, ``‖H‖_F`` is the quantity the linear stability of SGD bounds (Wu, Wang & Su, NeurIPS 2022).

    Args:
        op: a symmetric :class:`~sharpness.curvature.linop.LinearOperator`.
        num_matvecs: number of products, ``>= 1``: one per probe (the standard error needs ``>= 2``).
            Deprecated alias: ``num_samples``.
        generator: source of the probes; default a fresh generator seeded 0.

    References: Hutchinson (1989); Avron & Toledo (2011).
    """
    op = counting(op)
    num_matvecs = check_integer(num_matvecs, "num_matvecs", low=1)
    generator = default_generator(generator)
    samples = []
    for _ in range(num_matvecs):
        v = rademacher(op.dim, dtype=op.dtype, device=op.device, generator=generator)
        samples.append(float(torch.linalg.vector_norm(op.matvec(v))) ** 2)
    squared, squared_stderr = _mean_stderr(samples)
    value = math.sqrt(max(squared, 0.0))
    if value > 0:
        stderr = squared_stderr / (2 * value)
    else:  # every ‖A v‖ was 0: A = 0 (up to probes), exactly
        stderr = 0.0 if squared_stderr == 0 else math.nan
    return FrobeniusEstimate(
        value=value,
        stderr=stderr,
        squared=squared,
        squared_stderr=squared_stderr,
        num_probes=num_matvecs,
        num_matvecs=op.num_matvecs,
    )
