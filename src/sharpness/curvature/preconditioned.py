r"""The preconditioned sharpness ``λ_max(P⁻¹H)`` of an adaptive optimizer, with ``P`` from the optimizer's own state.

Cohen et al., "Adaptive gradient methods at the edge of stability" (arXiv 2207.14484): full-batch Adam trains with
the top eigenvalue of the *preconditioned* Hessian ``P⁻¹H`` at its stability edge ``(2 + 2β₁)/((1 − β₁)η)``
(:func:`~sharpness.curvature.edges.adam_edge`), while the raw ``λ_max(H)`` is free to grow past ``2/η``.

``P`` is the diagonal that makes the optimizer's step read ``w ← w − η P⁻¹ m`` (``m`` the EMA momentum, or the
gradient), taken from the state the optimizer keeps (as of its last step):

- ``torch.optim.Adam`` / ``AdamW`` after ``t`` steps: torch steps by ``η/(1 − β₁ᵗ) · m/(√v̂ + ε)`` with
  ``v̂ = v/(1 − β₂ᵗ)`` (``v`` = ``exp_avg_sq``, or ``max_exp_avg_sq`` with ``amsgrad``), so
  ``P = (1 − β₁ᵗ) diag(√v̂ + ε)``; the momentum's bias correction ``1 − β₁ᵗ`` is folded into ``P`` as in Cohen
  et al. and tends to 1 after a few dozen steps (then ``P = diag(√v̂ + ε)``).
- ``torch.optim.RMSprop``: ``P = diag(√v + ε)`` with ``v`` = ``square_avg``; centred:
  ``P = diag(√(v − ḡ²) + ε)`` with ``ḡ`` = ``grad_avg`` (torch's own denominator; no bias correction).

A wrapper with a ``base_optimizer`` (:class:`~sharpness.SAM`, :class:`~sharpness.MSAM`) is looked through to it.
Parameters the optimizer holds no state for (never stepped) get ``P = ∞``: the optimizer does not move them, so
they are no part of its dynamics (``P^{-1/2} = 0`` there).

:class:`PreconditionedOperator` is ``v ↦ P^{-1/2} H P^{-1/2} v``: symmetric (so Lanczos applies) and similar to
``P⁻¹H`` (``P⁻¹H = P^{-1/2} (P^{-1/2} H P^{-1/2}) P^{1/2}``), so it has the same eigenvalues.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from sharpness.curvature.linop import LinearOperator, check_operator


def state_holder(optimizer: Optimizer) -> Optimizer:
    """The optimizer whose state holds the preconditioner: ``optimizer.base_optimizer`` for a wrapper, else itself."""
    base = getattr(optimizer, "base_optimizer", None)
    return base if isinstance(base, Optimizer) else optimizer


def is_adaptive(optimizer: Optimizer) -> bool:
    """Whether :func:`adaptive_preconditioner` knows the optimizer (Adam, AdamW, RMSprop, possibly wrapped)."""
    return isinstance(state_holder(optimizer), torch.optim.Adam | torch.optim.RMSprop)


def adaptive_preconditioner(optimizer: Optimizer, params: Sequence[Tensor]) -> Tensor | None:
    """The diagonal of ``P`` as a flat vector over ``params`` (in their order), or ``None`` when there is none.

    ``None`` when the optimizer is not Adam, AdamW or RMSprop (nor wraps one) or has not stepped yet. ``params``
    are tensors of the optimizer's groups, e.g. a :class:`HessianOperator`'s ``params``; one the optimizer holds no
    state for gets ``P = ∞`` (module docstring).
    """
    holder = state_holder(optimizer)
    if not is_adaptive(holder) or not any(holder.state.get(p) for p in params):
        return None
    groups = {p: group for group in holder.param_groups for p in group["params"]}
    diagonals = []
    for p in params:
        state, group = holder.state.get(p), groups.get(p)
        if not state or group is None:
            diagonals.append(torch.full((p.numel(),), torch.inf, dtype=p.dtype, device=p.device))
        elif isinstance(holder, torch.optim.Adam):
            diagonals.append(_adam_diagonal(state, group).reshape(-1).to(p.dtype))
        else:
            diagonals.append(_rmsprop_diagonal(state, group).reshape(-1).to(p.dtype))
    return torch.cat(diagonals)


def _adam_diagonal(state: dict, group: dict) -> Tensor:
    """``(1 − β₁ᵗ)(√(v/(1 − β₂ᵗ)) + ε)``, torch's Adam/AdamW denominator and step-size correction."""
    beta1, beta2 = (float(b) for b in group["betas"])
    t = float(state["step"])
    second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    return (1.0 - beta1**t) * ((second / (1.0 - beta2**t)).sqrt() + group["eps"])


def _rmsprop_diagonal(state: dict, group: dict) -> Tensor:
    """``√v + ε``, or ``√(v − ḡ²) + ε`` when centred: torch's RMSprop denominator."""
    second = state["square_avg"]
    if group.get("centered"):
        second = second - state["grad_avg"] ** 2
    return second.sqrt() + group["eps"]


class PreconditionedOperator:
    """``v ↦ P^{-1/2} H P^{-1/2} v`` for a positive diagonal ``P``: the eigenvalues of ``P⁻¹H``, symmetrically.

    Args:
        op: the Hessian (any symmetric :class:`~sharpness.curvature.linop.LinearOperator`, e.g. a
            :class:`~sharpness.curvature.HessianOperator`).
        preconditioner: the flat diagonal of ``P`` (``op.dim`` entries ``> 0``, ``∞`` allowed: that coordinate is
            dropped), e.g. from :func:`adaptive_preconditioner`.

    ``num_matvecs`` counts products (each one product of ``op``).
    """

    def __init__(self, op: LinearOperator, preconditioner: Tensor) -> None:
        check_operator(op)
        if preconditioner.shape != (op.dim,):
            shape = tuple(preconditioner.shape)
            raise ValueError(f"preconditioner must be the flat ({op.dim},) diagonal of P, got shape {shape}")
        if not bool((preconditioner > 0).all()):
            raise ValueError("preconditioner must be > 0 everywhere (P = diag(√v̂ + ε) with ε > 0); got a zero or NaN")
        self.op = op
        self.dim, self.dtype, self.device = op.dim, op.dtype, torch.device(op.device)
        self.scale = preconditioner.to(dtype=op.dtype, device=self.device).rsqrt()
        self.num_matvecs = 0

    def matvec(self, v: Tensor) -> Tensor:
        self.num_matvecs += 1
        return self.scale * self.op.matvec(self.scale * v)

    def __repr__(self) -> str:
        return f"PreconditionedOperator({self.op!r}, num_matvecs={self.num_matvecs})"
