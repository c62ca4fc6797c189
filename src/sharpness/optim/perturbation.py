"""First-order solution of SAM's inner maximisation for a general p-norm ball.

SAM (Foret et al., ICLR 2021, arXiv 2010.01412, eq. 2) replaces
``max_{||ε||_p ≤ ρ} L(w + ε)`` by its first-order Taylor model ``max_{||ε||_p ≤ ρ} <h, ε>``, where ``h`` is the
gradient (or, for ASAM, the gradient in the rescaled coordinates ``T_w g``). The maximiser is given by the
dual norm, ``1/p + 1/q = 1``:

    ε̂ = ρ · sign(h) |h|^{q-1} / ||h||_q^{q-1},          max = ρ ||h||_q,

with the limits ``p = 2 → ε̂ = ρ h / ||h||_2``, ``p = ∞ → ε̂ = ρ sign(h)`` and ``p = 1 → ε̂ = ρ sign(h_j) e_j`` at
``j = argmax |h_j|`` (ties share ρ equally). Everything is homogeneous of degree 0 in ``h``, so a gradient that
carries a loss scale (fp16 ``GradScaler``) gives the same ε̂.

The functions work on *buckets*: a list of tensor lists, each list on one device and of one dtype, so every
operation is a ``torch._foreach_*`` call per bucket and never a Python loop over parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

Buckets = Sequence[list[Tensor]]


def dual_exponent(p: float) -> float:
    """Return ``q`` with ``1/p + 1/q = 1`` (``q = ∞`` for ``p = 1`` and ``q = 1`` for ``p = ∞``)."""
    if p == 1:
        return math.inf
    if math.isinf(p):
        return 1.0
    return p / (p - 1.0)


def global_norm(buckets: Buckets, ord: float) -> float:
    """``||concat(buckets)||_ord`` as a Python float, accumulated in float64 (one host sync)."""
    per_bucket = [
        torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, ord)).double(), ord) for tensors in buckets
    ]
    return float(torch.linalg.vector_norm(torch.stack(per_bucket), ord))


def dual_norm(buckets: Buckets, p: float) -> float:
    """``||h||_q``: the first-order gain ``max_{||ε||_p ≤ 1} <h, ε>``; inf or nan when ``h`` is not finite.

    For a general ``p`` the q-norm is evaluated on ``h / ||h||_∞`` so that ``|h|^q`` neither overflows nor
    underflows when ``q`` is large (``p`` close to 1).
    """
    if p == 2:
        return global_norm(buckets, 2.0)
    q = dual_exponent(p)
    if q in (1.0, math.inf):
        return global_norm(buckets, q)
    h_max = global_norm(buckets, math.inf)
    if not math.isfinite(h_max) or h_max == 0.0:
        return h_max
    return h_max * global_norm([torch._foreach_div(tensors, h_max) for tensors in buckets], q)


def unit_ascent(buckets: Buckets, p: float, h_dual_norm: float) -> tuple[list[list[Tensor]], float]:
    """The maximiser of ``<h, d>`` over ``||d||_p ≤ 1`` as ``coefficient * directions``.

    Returns ``(directions, coefficient)`` with the same bucket structure as ``buckets``; the perturbation is
    ``ε = ρ · coefficient · directions``. Splitting off the scalar lets the caller fuse it into one
    ``_foreach_add_(params, directions, alpha=ρ·coefficient)``; for ``p = 2`` the directions are ``h`` itself
    (no copy). ``h_dual_norm`` must be ``dual_norm(buckets, p)``, finite and positive.
    """
    if not (math.isfinite(h_dual_norm) and h_dual_norm > 0.0):
        raise ValueError(f"unit_ascent needs a finite, positive dual norm, got {h_dual_norm}")
    if p == 2:
        return [list(tensors) for tensors in buckets], 1.0 / h_dual_norm
    if math.isinf(p):
        return [list(torch._foreach_sign(tensors)) for tensors in buckets], 1.0
    if p == 1:
        # All mass on the largest |h_j| (shared equally between ties): mask = 1 + sign(|h| - max|h|).
        directions, ties = [], 0.0
        for tensors in buckets:
            mask = torch._foreach_sub(torch._foreach_abs(tensors), h_dual_norm)
            torch._foreach_sign_(mask)
            torch._foreach_add_(mask, 1)
            ties += float(torch.stack(torch._foreach_norm(mask, 1)).double().sum())
            torch._foreach_mul_(mask, torch._foreach_sign(tensors))
            directions.append(list(mask))
        return directions, 1.0 / ties
    q = dual_exponent(p)
    h_max = global_norm(buckets, math.inf)
    u_q_norm = h_dual_norm / h_max
    directions = []
    for tensors in buckets:
        u = torch._foreach_div(tensors, h_max)
        d = torch._foreach_abs(u)
        torch._foreach_pow_(d, q - 1.0)
        torch._foreach_mul_(d, torch._foreach_sign(u))
        directions.append(list(d))
    return directions, 1.0 / u_q_norm ** (q - 1.0)
