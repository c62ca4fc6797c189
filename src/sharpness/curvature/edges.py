"""Stability edges: the curvature at which a training dynamic stops being (linearly) stable.

- Gradient descent with step ``η`` on a quadratic is stable iff ``λ_max ≤ 2/η``; at the edge of stability
  ``λ_max`` rises to ≈ ``2/η`` and hovers there (Cohen et al., ICLR 2021, arXiv 2103.00065).
- Normalised SAM, ``w ← w − η ∇L(w + ρ g/||g||)``, on a quadratic: the edge is the ``λ`` solving
  ``ηλ (1 + ρλ/||g||) = 2``, i.e. ``(||g||/2ρ)(√(1 + 8ρ/(η||g||)) − 1)``, below ``2/η`` and depending on the
  gradient norm (Long & Bartlett, JMLR 2024, arXiv 2309.12488). Un-normalised SAM (``ε = ρ g``):
  ``ηλ(1 + ρλ) = 2``.
- SGD with batch ``B``: a linearly stable minimum has ``||H||_F ≤ (1/η) √(B/μ)`` with ``μ`` the alignment factor
  of the SGD noise (Wu, Wang & Su, NeurIPS 2022, arXiv 2207.02628).

The SAM edges are evaluated as ``4 / (η (1 + √(1 + 8ρ/(η||g||))))``, algebraically equal to the forms above and
free of cancellation for small ``ρ`` (``ρ = 0`` gives ``2/η`` exactly).
"""

from __future__ import annotations

import math


def _positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def gd_edge(lr: float) -> float:
    """``2/η``: the largest Hessian eigenvalue at which gradient descent with step ``lr`` is stable."""
    return 2.0 / _positive("lr", lr)


def sam_edge(lr: float, rho: float, grad_norm: float) -> float:
    """Normalised SAM's edge: the ``λ`` with ``ηλ (1 + ρλ/||g||) = 2`` (Long & Bartlett, 2024)."""
    lr, rho, grad_norm = _positive("lr", lr), _positive("rho", rho, allow_zero=True), _positive("grad_norm", grad_norm)
    return 4.0 / (lr * (1.0 + math.sqrt(1.0 + 8.0 * rho / (lr * grad_norm))))


def sam_edge_unnormalized(lr: float, rho: float) -> float:
    """Un-normalised SAM's (``ε = ρ g``) edge: the ``λ`` with ``ηλ (1 + ρλ) = 2``."""
    lr, rho = _positive("lr", lr), _positive("rho", rho, allow_zero=True)
    return 4.0 / (lr * (1.0 + math.sqrt(1.0 + 8.0 * rho / lr)))


def sgd_frobenius_bound(lr: float, batch_size: int, alignment: float) -> float:
    """``(1/η) √(B/μ)``: the largest ``||H||_F`` of a minimum that SGD can be linearly stable at (Wu et al., 2022)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return math.sqrt(batch_size / _positive("alignment", alignment)) / _positive("lr", lr)
