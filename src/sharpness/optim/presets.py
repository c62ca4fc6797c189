"""Named members of the SAM family, each a composition of :class:`SAM` with a policy and a reuse rule.

=================  ==============================  =====================  ==========================================
preset             policy                          reuse                  reference
=================  ==============================  =====================  ==========================================
``PeriodicSAM``    ``EveryK(k)``                   none                   SAM every k-th step
``RandomSAM``      ``Bernoulli(prob)``             none                   SS-SAM / RST (Zhao et al., 2022)
``LookSAM``        ``EveryK(k)``                   ``LookSAMReuse(α)``    Liu et al., CVPR 2022 (k = 5, α = 0.7)
``AESAM``          ``Adaptive(δ, λ₁, λ₂, T)``      none                   Jiang et al., ICLR 2023
``AELookSAM``      ``Adaptive(δ, λ₁, λ₂, T)``      ``LookSAMReuse(α)``    Jiang et al., ICLR 2023
``LateSAM``        ``Late(start, then, T)``        none                   Zhou et al., ICLR 2025
=================  ==============================  =====================  ==========================================

Each is a subclass of :class:`SAM` (so ``isinstance(opt, SAM)`` holds, and ``isinstance(opt, AESAM)`` says which
member it is) taking the arguments of :class:`SAM` (``params, base_optimizer, rho, ...``, base optimizer keywords)
plus its own. ``total_steps`` may be left ``None`` when training with
:class:`sharpness.train.Trainer`, which sets it. Every preset perturbs a subset of the parameters when given the
parameter groups of :func:`sharpness.optim.perturb_subset` (SAM-ON: ``perturb_subset(model, "norm")``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sharpness.optim.policy import Adaptive, Bernoulli, EveryK, Late, Policy
from sharpness.optim.reuse import LookSAMReuse
from sharpness.optim.sam import SAM


class PeriodicSAM(SAM):
    """SAM on every ``k``-th step (the first step included), plain ERM steps in between."""

    def __init__(self, params: Any, base_optimizer: Any, rho: float = 0.05, *, k: int = 2, **kwargs: Any) -> None:
        super().__init__(params, base_optimizer, rho, policy=EveryK(k), **kwargs)


class RandomSAM(SAM):
    """SAM with probability ``prob`` per step (or ``prob(t/T)``, a schedule of training progress).

    ``p`` is SAM's norm, as for every preset (version 0.1 used ``p`` for the probability).
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: Any,
        rho: float = 0.05,
        *,
        prob: float | Callable[[float], float] = 0.5,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho, policy=Bernoulli(prob, seed=seed), **kwargs)


class LookSAM(SAM):
    """SAM every ``k`` steps; the steps between add ``α ||g|| g_v/||g_v||`` (LookSAM's reuse)."""

    def __init__(
        self,
        params: Any,
        base_optimizer: Any,
        rho: float = 0.05,
        *,
        k: int = 5,
        alpha: float = 0.7,
        per_tensor: bool = False,
        **kwargs: Any,
    ) -> None:
        reuse = LookSAMReuse(alpha, per_tensor)
        super().__init__(params, base_optimizer, rho, policy=EveryK(k), reuse=reuse, **kwargs)


class AESAM(SAM):
    """SAM where ``||g_t||²`` is high relative to its moving mean and deviation (AE-SAM's adaptive rule)."""

    def __init__(
        self,
        params: Any,
        base_optimizer: Any,
        rho: float = 0.05,
        *,
        delta: float = 0.9,
        lambda1: float = -1.0,
        lambda2: float = 1.0,
        total_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        policy = Adaptive(delta, lambda1, lambda2, total_steps)
        super().__init__(params, base_optimizer, rho, policy=policy, **kwargs)


class AELookSAM(SAM):
    """AE-SAM's adaptive policy with LookSAM's reuse on the ERM steps (``g_v`` refreshed on every SAM step)."""

    def __init__(
        self,
        params: Any,
        base_optimizer: Any,
        rho: float = 0.05,
        *,
        delta: float = 0.9,
        lambda1: float = -1.0,
        lambda2: float = 1.0,
        total_steps: int | None = None,
        alpha: float = 0.7,
        per_tensor: bool = False,
        **kwargs: Any,
    ) -> None:
        policy = Adaptive(delta, lambda1, lambda2, total_steps)
        reuse = LookSAMReuse(alpha, per_tensor)
        super().__init__(params, base_optimizer, rho, policy=policy, reuse=reuse, **kwargs)


class LateSAM(SAM):
    """The base optimizer alone for the first ``start · T`` steps, then SAM (Zhou et al., ICLR 2025).

    ``then`` is the late phase's policy (default: every step SAM); ``then=Adaptive()`` is AE-SAM in the late
    phase, ``then=EveryK(5)`` with ``reuse=LookSAMReuse(0.7)`` LookSAM. See :class:`~sharpness.optim.policy.Late`.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: Any,
        rho: float = 0.05,
        *,
        start: float = 0.8,
        then: Policy | None = None,
        total_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho, policy=Late(start, then, total_steps), **kwargs)
