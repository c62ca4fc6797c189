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

from sharpness.checks import check_integer, check_real


def _positive(name: str, value: float) -> float:
    """``value`` as a float if it is a finite number > 0."""
    return check_real(value, name, low=0.0, low_open=True)


def gd_edge(lr: float) -> float:
    """``2/η``: the largest Hessian eigenvalue at which gradient descent with step ``lr`` is stable."""
    return 2.0 / _positive("lr", lr)


def sam_edge(lr: float, rho: float, grad_norm: float) -> float:
    """Normalised SAM's edge: the ``λ`` with ``ηλ (1 + ρλ/||g||) = 2`` (Long & Bartlett, 2024)."""
    lr, rho, grad_norm = _positive("lr", lr), check_real(rho, "rho", low=0.0), _positive("grad_norm", grad_norm)
    return 4.0 / (lr * (1.0 + math.sqrt(1.0 + 8.0 * rho / (lr * grad_norm))))


def sam_edge_unnormalized(lr: float, rho: float) -> float:
    """Un-normalised SAM's (``ε = ρ g``) edge: the ``λ`` with ``ηλ (1 + ρλ) = 2``."""
    lr, rho = _positive("lr", lr), check_real(rho, "rho", low=0.0)
    return 4.0 / (lr * (1.0 + math.sqrt(1.0 + 8.0 * rho / lr)))


def sgd_frobenius_bound(lr: float, batch_size: int, alignment: float) -> float:
    """``(1/η) √(B/μ)``: the largest ``||H||_F`` of a minimum that SGD can be linearly stable at (Wu et al., 2022)."""
    batch_size = check_integer(batch_size, "batch_size", low=1)
    return math.sqrt(batch_size / _positive("alignment", alignment)) / _positive("lr", lr)
