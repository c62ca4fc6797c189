r"""Stability edges: the curvature at which a training dynamic stops being (linearly) stable.

Every edge here comes from the same model: the loss is the quadratic ``L(w) = ½ wᵀHw`` (its local second-order
model), the optimizer's statistics that are not linear in ``w`` (``||g||``, Adam's second moment) are frozen,
and the update is then a linear map per eigen-direction of ``H`` (of ``P^{-1/2} H P^{-1/2}`` for a preconditioned
method). The edge is the largest eigenvalue ``λ`` for which that map's spectral radius stays below 1; at the
edge of stability training drives the sharpness up to it and hovers there (Cohen et al., ICLR 2021,
arXiv 2103.00065; Cohen et al., "Adaptive gradient methods at the edge of stability", arXiv 2207.14484).

For a direction of curvature ``λ`` with ``a = ηλ``:

- **GD**, ``x ← (1 − a) x``: stable iff ``a < 2``, the edge ``2/η``.
- **Heavy-ball momentum** (``torch.optim.SGD``: ``v ← βv + (1 − τ) g``, ``w ← w − ηv``, dampening ``τ``): with
  ``ã = (1 − τ)a`` the state ``(x, v)`` maps by ``[[1 − ã, −ηβ], [ã/η, β]]``, of trace ``1 + β − ã`` and
  determinant ``β``. By the Jury conditions (``p(1) > 0``, ``p(−1) > 0``, ``|det| < 1`` for
  ``p(z) = z² − tr z + det``) it is stable iff ``0 < ã < 2 + 2β``: the edge ``(2 + 2β)/((1 − τ)η)``.
- **Nesterov** (``torch.optim.SGD(nesterov=True)``: ``v ← βv + g``, ``w ← w − η(g + βv)``): trace
  ``1 + β − a(1 + β)``, determinant ``β(1 − a)``, ``p(−1) = 2 + 2β − a(1 + 2β)``: the edge
  ``(2 + 2β)/((1 + 2β)η)``.
- **Adam / AdamW** (``m ← β₁m + (1 − β₁)g``, ``w ← w − ηP⁻¹m``, ``P = (1 − β₁ᵗ) diag(√v̂ + ε)`` frozen; see
  :mod:`sharpness.curvature.preconditioned`): in the coordinates ``u = P^{1/2} w`` this is heavy-ball momentum
  ``β₁`` with step ``(1 − β₁)η`` on ``P^{-1/2} H P^{-1/2}``, whose eigenvalues are those of ``P⁻¹H``. The edge of
  the *preconditioned sharpness* ``λ_max(P⁻¹H)`` is ``(2 + 2β₁)/((1 − β₁)η)``, ``38/η`` at ``β₁ = 0.9``
  (Cohen et al. 2022, Table 2).
- **RMSprop** (``w ← w − ηP⁻¹g`` with ``P = diag(√v + ε)``, or with momentum ``μ``: ``b ← μb + P⁻¹g``,
  ``w ← w − ηb``): heavy-ball momentum ``μ`` on ``P^{-1/2} H P^{-1/2}``, the edge ``(2 + 2μ)/η`` of
  ``λ_max(P⁻¹H)`` (``2/η`` without momentum): :func:`momentum_edge` with the preconditioned sharpness.
- **Normalised SAM** around any of the raw-coordinate bases above, ``w ← base step with ∇L(w + ρ g/||g||)``: on
  the quadratic with ``||g||`` frozen the gradient the base sees is ``H(w + ρHw/||g||) = (H + ρH²/||g||) w``, so
  every eigen-direction is the base's dynamic with ``λ`` replaced by ``λ(1 + ρλ/||g||)``. If the base's edge is
  ``λ₀``, SAM's is the ``λ`` solving ``λ(1 + ρλ/||g||) = λ₀``: GD gives ``ηλ(1 + ρλ/||g||) = 2``, i.e.
  ``(||g||/2ρ)(√(1 + 8ρ/(η||g||)) − 1)``, below ``2/η`` and depending on the gradient norm (Long & Bartlett,
  JMLR 2024, arXiv 2309.12488); heavy-ball momentum gives ``ηλ(1 + ρλ/||g||) = 2 + 2β``. Un-normalised SAM
  (``ε = ρ g``): ``ηλ(1 + ρλ) = 2``.
- **Momentum-SAM** (MSAM, Becker et al., arXiv 2401.12033: the gradient at ``w − ρ v/||v||`` with SGD's buffer
  ``v``, ``||v||`` frozen): ``v ← (β − (1 − τ)ρλ/||v||) v + (1 − τ)λ w`` is heavy-ball momentum with
  ``β' = β − (1 − τ)ρλ/||v||``, stable iff ``(1 − τ)ηλ < 2 + 2β'``, i.e. the edge
  ``(2 + 2β)/((1 − τ)(η + 2ρ/||v||))`` (the other Jury condition, ``β' > −1``, is then implied).
- SGD with batch ``B``: a linearly stable minimum has ``||H||_F ≤ (1/η) √(B/μ)`` with ``μ`` the alignment factor
  of the SGD noise (Wu, Wang & Su, NeurIPS 2022, arXiv 2207.02628).

The SAM edges are evaluated as ``2λ₀ / (1 + √(1 + 4ρλ₀/||g||))``, algebraically equal to the root above and free of
cancellation for small ``ρ`` (``ρ = 0`` gives ``λ₀`` exactly). Weight decay is not in these edges: coupled (L2)
decay ``wd`` adds ``wd·I`` to ``H`` (the edge of ``λ_max(H)`` drops by ``wd``), decoupled decay contracts ``w``
by ``1 − η·wd`` per step (it can only stabilise).
"""

from __future__ import annotations

import math

from sharpness.checks import check_integer, check_real


def _positive(name: str, value: float) -> float:
    """``value`` as a float if it is a finite number > 0."""
    return check_real(value, name, low=0.0, low_open=True)


def _momentum(name: str, value: float) -> float:
    """A momentum (or EMA) coefficient in ``[0, 1)``."""
    return check_real(value, name, low=0.0, high=1.0, high_open=True)


def gd_edge(lr: float) -> float:
    """``2/η``: the largest Hessian eigenvalue at which gradient descent with step ``lr`` is stable."""
    return 2.0 / _positive("lr", lr)


def momentum_edge(lr: float, momentum: float, *, dampening: float = 0.0, nesterov: bool = False) -> float:
    """Heavy-ball momentum's edge ``(2 + 2β)/((1 − τ)η)``, or Nesterov's ``(2 + 2β)/((1 + 2β)η)`` (module docstring).

    ``momentum``, ``dampening`` and ``nesterov`` are ``torch.optim.SGD``'s (torch allows Nesterov only without
    dampening). ``momentum = 0`` gives ``2/η``. Also RMSprop's edge of the preconditioned sharpness, with its
    ``momentum``.
    """
    lr, beta = _positive("lr", lr), _momentum("momentum", momentum)
    dampening = check_real(dampening, "dampening", low=0.0, high=1.0, high_open=True)
    if nesterov:
        if dampening != 0.0:
            raise ValueError("momentum_edge: Nesterov momentum needs dampening=0 (as torch.optim.SGD requires)")
        return (2.0 + 2.0 * beta) / ((1.0 + 2.0 * beta) * lr)
    return (2.0 + 2.0 * beta) / ((1.0 - dampening) * lr)


def adam_edge(lr: float, beta1: float) -> float:
    """Adam's edge of the preconditioned sharpness ``λ_max(P⁻¹H)``: ``(2 + 2β₁)/((1 − β₁)η)`` (``38/η`` at 0.9).

    Cohen et al., arXiv 2207.14484: full-batch Adam trains with ``λ_max(P⁻¹H)`` at this value (the Adaptive Edge of
    Stability); the derivation is in the module docstring.
    """
    lr, beta1 = _positive("lr", lr), _momentum("beta1", beta1)
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)


def sam_edge_around(base_edge: float, rho: float, grad_norm: float) -> float:
    """Normalised SAM's edge around a base optimizer whose own edge is ``base_edge`` (``λ₀``).

    The ``λ`` with ``λ(1 + ρλ/||g||) = λ₀``: SAM's frozen-``||g||`` gradient on the quadratic is ``(H + ρH²/||g||) w``,
    so each eigen-direction sees the base's dynamic at curvature ``λ(1 + ρλ/||g||)``. Exact for a base that
    acts on raw coordinates (GD, heavy-ball, Nesterov), not for a preconditioned one. ``λ₀ = ∞`` gives ``∞``.
    """
    base_edge = check_real(base_edge, "base_edge", low=0.0, low_open=True, allow_inf=True)
    rho, grad_norm = check_real(rho, "rho", low=0.0), _positive("grad_norm", grad_norm)
    if math.isinf(base_edge):
        return math.inf
    return 2.0 * base_edge / (1.0 + math.sqrt(1.0 + 4.0 * rho * base_edge / grad_norm))


def sam_edge(lr: float, rho: float, grad_norm: float, *, momentum: float = 0.0) -> float:
    """Normalised SAM's edge: the ``λ`` with ``ηλ (1 + ρλ/||g||) = 2 + 2β`` (Long & Bartlett, 2024, for ``β = 0``).

    ``momentum`` is the base's heavy-ball momentum ``β`` (``torch.optim.SGD(momentum=β)``); ``0``: SAM around GD.
    """
    return sam_edge_around(momentum_edge(lr, momentum), rho, grad_norm)


def msam_edge(lr: float, rho: float, momentum_norm: float, momentum: float, *, dampening: float = 0.0) -> float:
    """Momentum-SAM's edge ``(2 + 2β)/((1 − τ)(η + 2ρ/||v||))`` around SGD with heavy-ball momentum (``||v||`` frozen).

    ``momentum_norm`` is ``||v||`` of the SGD buffer MSAM perturbs along; ``0`` (no momentum yet: no perturbation)
    gives the heavy-ball edge. Derivation in the module docstring.
    """
    lr, rho = _positive("lr", lr), check_real(rho, "rho", low=0.0)
    momentum_norm = check_real(momentum_norm, "momentum_norm", low=0.0)
    base = momentum_edge(lr, momentum, dampening=dampening)
    if momentum_norm == 0.0:
        return base
    return base * lr / (lr + 2.0 * rho / momentum_norm)


def sam_edge_unnormalized(lr: float, rho: float) -> float:
    """Un-normalised SAM's (``ε = ρ g``) edge: the ``λ`` with ``ηλ (1 + ρλ) = 2``."""
    lr, rho = _positive("lr", lr), check_real(rho, "rho", low=0.0)
    return 4.0 / (lr * (1.0 + math.sqrt(1.0 + 8.0 * rho / lr)))


def sgd_frobenius_bound(lr: float, batch_size: int, alignment: float) -> float:
    """``(1/η) √(B/μ)``: the largest ``||H||_F`` of a minimum that SGD can be linearly stable at (Wu et al., 2022)."""
    batch_size = check_integer(batch_size, "batch_size", low=1)
    return math.sqrt(batch_size / _positive("alignment", alignment)) / _positive("lr", lr)
