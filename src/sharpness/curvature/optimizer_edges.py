r"""The stability edge that applies to a given optimizer, and which sharpness it bounds.

:func:`optimizer_edge` reads an optimizer's hyper-parameters (and, for SAM and MSAM, the current ``||g||`` or
``||v||``) and returns a :class:`StabilityEdge`: the value, a ``kind`` from one vocabulary, and whether the edge is
one of the raw sharpness ``λ_max(H)`` or of the preconditioned ``λ_max(P⁻¹H)``
(:mod:`sharpness.curvature.preconditioned`). The formulas and their derivations are in
:mod:`sharpness.curvature.edges`.

The vocabulary of ``kind``: ``[perturbation "+"] base [qualifier]``, or ``"unknown"``.

- ``base``: ``"gd"`` (SGD without momentum, ``2/η``), ``"momentum"`` (SGD heavy-ball, ``(2 + 2β)/((1 − τ)η)``),
  ``"nesterov"`` (``(2 + 2β)/((1 + 2β)η)``), ``"adam"`` (Adam/AdamW, ``(2 + 2β₁)/((1 − β₁)η)`` of ``λ_max(P⁻¹H)``),
  ``"rmsprop"`` (``(2 + 2μ)/η`` of ``λ_max(P⁻¹H)``).
- ``perturbation``: ``"sam"`` (normalised SAM), ``"asam"`` (SAM with ``adaptive=True``), ``"msam"`` (Momentum-SAM);
  around ``gd`` the base is not written (``"sam"``, not ``"sam+gd"``).
- ``qualifier``: none when the edge is exact in the frozen-statistics quadratic model; ``" (bound)"`` when it is
  an upper bound of that model's edge; ``" (approximate)"`` when no derivation covers the case and the base's
  edge is reported as a proxy.

What is exact, bounded or approximate:

- SAM (``p = 2``, every group perturbed, one ρ, not ASAM, not m-sharpness) around gd/momentum/nesterov: exact,
  :func:`~sharpness.curvature.edges.sam_edge_around` with the measured ``||g||``.
- Every other SAM step reports the base's edge as ``" (bound)"``: ASAM, ``p ≠ 2``, SAM-ON subsets, per-group ρ,
  m-sharpness micro-batches, and SAM around Adam/RMSprop. Each perturbation is ``ε = ∇φ(g)`` for a convex ``φ``
  (``ρ||T g||_q`` for ASAM's ``T = |w| + η``, the norm of the perturbed subset, ...), so the linearised gradient
  at ``w + ε`` is ``(H + H J H) w`` with ``J = ∇²φ ⪰ 0``; with ``H J H ⪰ 0`` the dynamic is at least as unstable
  as the base's, whose edge is therefore an upper bound (for Adam in the coordinates ``P^{1/2} w``:
  ``P^{-1/2}(H + HJH)P^{-1/2} ⪰ P^{-1/2} H P^{-1/2}``). ASAM's normalised-SAM edge in its rescaled
  coordinates ``T⁻¹w`` is not an edge of the raw ``λ_max(H)``, so it is not reported.
- MSAM around SGD heavy-ball momentum: exact, :func:`~sharpness.curvature.edges.msam_edge` with ``||v||`` of the
  SGD buffer and ``ρ_t`` (ρ times its warm-up factor). MSAM around Nesterov or AdamW: ``" (approximate)"``, the
  base's edge (its perturbation along ``m`` does not commute with ``P``).
- Parameter groups that disagree on the edge's hyper-parameters (lr, momentum, dampening, nesterov, β₁): the first
  group's are used, ``" (approximate)"``.
- Any other optimizer (Adagrad, NAdam, a custom class): ``"unknown"``, value NaN.

A learning rate of 0 (the end of a cosine schedule) makes every edge ``∞``: a zero step is stable at any curvature.
Switching policies (a SAM step on some steps, a base step on the others) are handled by the caller: pass
``sam_step=False`` for the edge of the ERM steps (see :class:`~sharpness.train.tracking.SharpnessTracker`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from sharpness.curvature.edges import adam_edge, gd_edge, momentum_edge, msam_edge, sam_edge_around
from sharpness.curvature.preconditioned import state_holder
from sharpness.optim.msam import MSAM
from sharpness.optim.sam import SAM

EXACT, BOUND, APPROXIMATE = "", " (bound)", " (approximate)"


@dataclass(frozen=True)
class StabilityEdge:
    """An optimizer's stability edge: ``value`` (``∞`` at ``lr = 0``, NaN when ``kind == "unknown"``), ``kind``
    (the module's vocabulary) and ``preconditioned`` (an edge of ``λ_max(P⁻¹H)`` rather than ``λ_max(H)``)."""

    value: float
    kind: str
    preconditioned: bool


UNKNOWN = StabilityEdge(math.nan, "unknown", False)


def optimizer_edge(
    optimizer: Optimizer, grad_norm: float, *, sam_step: bool = True, micro_batches: bool = False
) -> StabilityEdge:
    """The edge of ``optimizer``'s next step at the current ``||g||`` (the full-batch gradient norm, used by SAM).

    Args:
        optimizer: ``torch.optim.SGD``/``Adam``/``AdamW``/``RMSprop``, or :class:`~sharpness.SAM` /
            :class:`~sharpness.MSAM` around one.
        grad_norm: ``||g||`` of the gradient SAM would normalise (``0``: SAM takes no perturbation).
        sam_step: for a SAM optimizer, the edge of a SAM step (``True``) or of an ERM step (the base alone).
        micro_batches: the SAM steps perturb per micro-batch (m-sharpness): the edge is then a bound.
    """
    base = _base_edge(state_holder(optimizer))
    if base.kind == "unknown":
        return base
    if isinstance(optimizer, SAM) and sam_step:
        return _sam_edge(optimizer, base, grad_norm, micro_batches)
    if isinstance(optimizer, MSAM):
        return _msam_edge(optimizer, base)
    return base


def _settings(optimizer: Optimizer, group: dict[str, Any]) -> tuple[Any, ...]:
    """The hyper-parameters of ``group`` that the base edge depends on."""
    if isinstance(optimizer, torch.optim.SGD):
        return float(group["lr"]), group["momentum"], group["dampening"], group["nesterov"]
    if isinstance(optimizer, torch.optim.Adam):
        return float(group["lr"]), float(group["betas"][0])
    return float(group["lr"]), group["momentum"]


def _base_edge(optimizer: Optimizer) -> StabilityEdge:
    """The edge of the base optimizer alone (group 0's settings; approximate when the groups disagree)."""
    if not isinstance(optimizer, torch.optim.SGD | torch.optim.Adam | torch.optim.RMSprop):
        return UNKNOWN
    settings = [_settings(optimizer, group) for group in optimizer.param_groups]
    qualifier = EXACT if all(s == settings[0] for s in settings) else APPROXIMATE
    lr, *rest = settings[0]
    if isinstance(optimizer, torch.optim.SGD):
        beta, dampening, nesterov = rest
        if beta == 0:  # torch ignores dampening and Nesterov without momentum
            return StabilityEdge(math.inf if lr == 0 else gd_edge(lr), "gd" + qualifier, False)
        kind = "nesterov" if nesterov else "momentum"
        value = math.inf if lr == 0 else momentum_edge(lr, beta, dampening=dampening, nesterov=nesterov)
        return StabilityEdge(value, kind + qualifier, False)
    if isinstance(optimizer, torch.optim.Adam):
        return StabilityEdge(math.inf if lr == 0 else adam_edge(lr, rest[0]), "adam" + qualifier, True)
    return StabilityEdge(math.inf if lr == 0 else momentum_edge(lr, rest[0]), "rmsprop" + qualifier, True)


def _named(perturbation: str, base: StabilityEdge, qualifier: str) -> str:
    """``perturbation+base`` with the weaker of the two qualifiers (approximate > bound > exact)."""
    name = base.kind.removesuffix(APPROXIMATE)
    joined = perturbation if name == "gd" else f"{perturbation}+{name}"
    return joined + (APPROXIMATE if base.kind.endswith(APPROXIMATE) else qualifier)


def _sam_edge(optimizer: SAM, base: StabilityEdge, grad_norm: float, micro_batches: bool) -> StabilityEdge:
    """A SAM step's edge: exact around a raw-coordinate base for plain normalised SAM, else the base's as a bound."""
    groups = optimizer.param_groups
    rho = groups[0]["sam_rho"]
    if rho == 0 or grad_norm == 0:  # no perturbation: the base's step
        return base
    adaptive = groups[0]["sam_adaptive"]
    exact = (
        not (adaptive or micro_batches or base.preconditioned)
        and groups[0]["sam_p"] == 2
        and all(g["sam_perturb"] and g["sam_rho"] == rho and not g["sam_adaptive"] for g in groups)
    )
    kind = _named("asam" if adaptive else "sam", base, EXACT if exact else BOUND)
    value = sam_edge_around(base.value, rho, grad_norm) if exact else base.value
    return StabilityEdge(value, kind, base.preconditioned)


def _msam_edge(optimizer: MSAM, base: StabilityEdge) -> StabilityEdge:
    """MSAM's edge: exact around SGD heavy-ball momentum (``||v||`` of its buffers, ``ρ_t``), else approximate."""
    groups = optimizer.param_groups
    rho = groups[0]["msam_rho"] * optimizer.warmup_factor()
    if rho == 0:  # no perturbation (yet): the base's step
        return base
    if base.kind != "momentum" or any(g["msam_rho"] != groups[0]["msam_rho"] for g in groups):
        return StabilityEdge(base.value, _named("msam", base, APPROXIMATE), base.preconditioned)
    if math.isinf(base.value):
        return StabilityEdge(math.inf, "msam+momentum", False)
    key = optimizer.momentum_key
    norm = math.sqrt(sum(float(s[key].double().pow(2).sum()) for s in optimizer.state.values() if key in s))
    value = msam_edge(float(groups[0]["lr"]), rho, norm, groups[0]["momentum"], dampening=groups[0]["dampening"])
    return StabilityEdge(value, "msam+momentum", False)
