"""Policies: whether a SAM step pays for its second (perturbed) pass.

A policy sees, once per step, the squared norm ``s_t = ||g_t||²`` of the first-pass gradient (loss scale
removed) and answers "SAM step or ERM step". :class:`~sharpness.optim.SAM` asks it before the second pass, so an
ERM step costs one forward/backward. Policies are small state machines whose whole state (step counter, moving
averages, random generator) and settings round-trip through ``state_dict`` so that a resumed run makes the same
decisions.

A decision is *tentative* until the optimizer takes the step: :meth:`Policy.commit` keeps the state it advanced
to, :meth:`Policy.discard` rolls it back (a step skipped for a non-finite gradient, or abandoned by an exception,
leaves the schedule, the moving averages and the random stream exactly as they were).

- :class:`Always`: plain SAM (Foret et al., 2021).
- :class:`EveryK`: SAM on steps ``0, k, 2k, ...`` (periodic SAM; LookSAM's schedule, Liu et al., CVPR 2022).
- :class:`Bernoulli`: SAM with probability ``p(t)``, constant or a schedule of training progress (SS-SAM / RST,
  Zhao et al., 2022).
- :class:`Adaptive`: AE-SAM's rule (Jiang, Yang, Zhang, Kwok, ICLR 2023, arXiv 2304.14647, Alg. 1).
- :class:`Late`: ERM until a fraction of training, then another policy (late-phase SAM; Zhou et al., ICLR 2025,
  arXiv 2410.10373).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch

from sharpness.checks import check_choice, check_integer, check_probability, check_real


class Policy:
    """Decides per step whether to take the SAM (two-pass) step. Subclasses implement :meth:`_decide`."""

    needs_grad_norm = False
    """Whether :meth:`decide` uses ``s_t`` (otherwise the optimizer passes NaN and skips computing it)."""

    replica_consistent = False
    """Whether replicas that start from the same state and see the same (global) ``s_t`` decide alike: required
    under data parallelism, where a replica deciding otherwise would wait forever in a collective. The built-in
    policies are; a subclass must say so (and then keep any randomness in :attr:`generator`, which SAM broadcasts
    from rank 0)."""

    def __init__(self) -> None:
        self.step = 0  # decisions taken so far (= optimizer steps)
        self.total_steps: int | None = None
        self._undo: dict[str, Any] | None = None  # the state before a tentative decision

    def decide(self, sq_grad_norm: float) -> bool:
        """The (tentative) decision for the current step, given ``s_t = ||g_t||²``; advances the state.

        Call :meth:`commit` once the step is taken or :meth:`discard` to roll the state back; deciding again
        without either keeps the previous decision's state (as :meth:`commit`).
        """
        self._undo = None
        undo = self.state_dict()
        wants = self._decide(sq_grad_norm)
        self.step += 1
        self._undo = undo
        return wants

    def commit(self) -> None:
        """Keep the state advanced by the last :meth:`decide` (the step was taken)."""
        self._undo = None

    def committed_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` without an uncommitted decision: what a checkpoint holds (the step is not taken)."""
        return dict(self._undo) if self._undo is not None else self.state_dict()

    def discard(self) -> None:
        """Roll back the last uncommitted :meth:`decide` (the step was skipped or abandoned)."""
        if self._undo is not None:
            self.load_state_dict(self._undo)
            self._undo = None

    def _decide(self, sq_grad_norm: float) -> bool:
        raise NotImplementedError

    def set_total_steps(self, total_steps: int) -> None:
        """The planned training length, for schedules of progress ``t / T`` (the training loop sets it)."""
        self.total_steps = check_integer(total_steps, "total_steps", owner=type(self).__name__, low=1)

    def progress(self) -> float:
        """``t / T`` clipped to [0, 1]; needs :attr:`total_steps`."""
        return min(self.step / self.planned_steps(), 1.0)

    def planned_steps(self) -> int:
        """:attr:`total_steps`; a one-line error saying how to set it when it is not known."""
        if self.total_steps is None:
            raise ValueError(
                f"{type(self).__name__} needs the training length: pass total_steps=..., or call "
                "opt.set_total_steps(T) before training (sharpness.train.Trainer does this)"
            )
        return self.total_steps

    def statistics(self) -> dict[str, float]:
        """What a training loop may log about the last decision."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The policy's type, settings and state; :meth:`load_state_dict` restores all of them."""
        return {"type": type(self).__name__, "step": self.step, "total_steps": self.total_steps, **self.settings()}

    def settings(self) -> dict[str, Any]:
        """The constructor's settings that are saved with the state (numbers and strings only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` of the same policy type (settings included); a clear error otherwise."""
        saved = state.get("type", type(self).__name__)  # format-1 checkpoints did not save the type
        if saved != type(self).__name__:
            raise ValueError(
                f"{type(self).__name__}: the state was saved by a {saved} policy; build the optimizer with the "
                "same preset (or policy) as the checkpoint"
            )
        missing = sorted({"step", "total_steps", *self._state_keys()} - set(state))
        if missing:
            raise ValueError(
                f"{type(self).__name__}: the saved policy state lacks {missing}; it is not from this policy"
            )
        self._load(state)

    def _state_keys(self) -> tuple[str, ...]:
        """Keys (besides step and total_steps) a saved state must have."""
        return ()

    def _load(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.total_steps = state["total_steps"]
        for key in self.settings():
            if key in state:
                setattr(self, key, state[key])

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Always(Policy):
    """Every step is a SAM step: plain SAM."""

    replica_consistent = True

    def _decide(self, sq_grad_norm: float) -> bool:
        return True


class EveryK(Policy):
    """SAM on steps ``t ≡ offset (mod k)`` (``offset`` 0: the first step is a SAM step); ERM otherwise.

    >>> policy = EveryK(3)
    >>> decisions = []
    >>> for _ in range(6):
    ...     decisions.append(policy.decide(float("nan")))
    ...     policy.commit()
    >>> decisions
    [True, False, False, True, False, False]
    """

    replica_consistent = True

    def __init__(self, k: int, offset: int = 0) -> None:
        super().__init__()
        self.k = check_integer(k, "k", owner="EveryK", low=1)
        self.offset = check_integer(offset, "offset", owner="EveryK", low=0, high=self.k - 1)

    def _decide(self, sq_grad_norm: float) -> bool:
        return self.step % self.k == self.offset

    def settings(self) -> dict[str, Any]:
        return {"k": self.k, "offset": self.offset}

    def __repr__(self) -> str:
        return f"EveryK(k={self.k}, offset={self.offset})"


class Bernoulli(Policy):
    """SAM with probability ``p`` (a number), or ``p(t/T)`` (a callable of training progress in [0, 1]).

    Draws come from the policy's own ``torch.Generator`` (seeded by ``seed``, saved in ``state_dict``), never from
    the global random state, so the training run's other randomness is unaffected.

    >>> policy = Bernoulli(0.5, seed=1)
    >>> taken = 0
    >>> for _ in range(1000):
    ...     taken += policy.decide(float("nan"))
    ...     policy.commit()
    >>> 430 < taken < 570
    True
    """

    replica_consistent = True

    def __init__(self, p: float | Callable[[float], float], seed: int = 0) -> None:
        super().__init__()
        self.p = p if callable(p) else self._check_probability(p)
        self.generator = torch.Generator().manual_seed(check_integer(seed, "seed", owner="Bernoulli"))
        self.last_p = math.nan

    @staticmethod
    def _check_probability(p: Any) -> float:
        return check_probability(p, "the probability", owner="Bernoulli")

    def _decide(self, sq_grad_norm: float) -> bool:
        self.last_p = self._check_probability(self.p(self.progress()) if callable(self.p) else self.p)
        return bool(torch.rand((), generator=self.generator) < self.last_p)

    def statistics(self) -> dict[str, float]:
        return {"p": self.last_p}

    def settings(self) -> dict[str, Any]:
        return {} if callable(self.p) else {"p": self.p}  # a schedule (a callable) stays the constructor's

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state(), "last_p": self.last_p}

    def _state_keys(self) -> tuple[str, ...]:
        return ("generator", "last_p")

    def _load(self, state: dict[str, Any]) -> None:
        super()._load(state)
        self.generator.set_state(state["generator"])
        self.last_p = state["last_p"]

    def __repr__(self) -> str:
        return f"Bernoulli(p={self.p!r})"


class Adaptive(Policy):
    r"""AE-SAM's rule: a SAM step iff ``s_t ≥ μ_t + c_t σ_t`` (Jiang et al., ICLR 2023, Alg. 1).

    ``s_t = ||g_t||²`` of the first-pass (mini-batch) gradient is a free signal of local sharpness; its moving
    mean and variance are

        μ_t = δ μ_{t-1} + (1-δ) s_t,      σ²_t = δ σ²_{t-1} + (1-δ) (s_t - μ_t)²,

    and the threshold ``c_t = (t/T) λ₁ + (1 - t/T) λ₂`` moves linearly from ``λ₂`` at ``t = 0`` to ``λ₁`` at
    ``t = T`` (held at ``λ₁`` after ``T``). With a Gaussian ``s_t`` a step is a SAM step with probability
    ``P(Z ≥ c_t)``: with the defaults ``λ₁ = -1, λ₂ = 1`` that rises from 16% to 84%, about half the steps on
    average, more of them late in training.

    Choices the paper leaves open (exposed here):

    - ``init="first"`` (default): the first observation seeds ``μ = s_0, σ² = 0`` (so step 0 is a SAM step, as
      ``s_0 ≥ μ_0``); ``init="zero"``: ``μ_{-1} = σ²_{-1} = 0``, the plain recursion from zero (biased low early on).
    - ``total_steps=None``: the training loop sets ``T`` (``opt.set_total_steps``); deciding without it is an error.
    - The defaults δ = 0.9, λ₁ = -1, λ₂ = 1 are those believed to be the paper's; they are not verified against it.
    """

    replica_consistent = True

    needs_grad_norm = True

    def __init__(
        self,
        delta: float = 0.9,
        lambda1: float = -1.0,
        lambda2: float = 1.0,
        total_steps: int | None = None,
        init: Literal["first", "zero"] = "first",
    ) -> None:
        super().__init__()
        self.delta = check_real(delta, "delta", owner="Adaptive", low=0.0, high=1.0, high_open=True)
        self.lambda1 = check_real(lambda1, "lambda1", owner="Adaptive")
        self.lambda2 = check_real(lambda2, "lambda2", owner="Adaptive")
        self.init = check_choice(init, "init", ("first", "zero"), owner="Adaptive")
        if total_steps is not None:
            self.set_total_steps(total_steps)
        self.mean = 0.0
        self.sigma = 0.0
        self.last = {"s": math.nan, "mu": math.nan, "sigma": math.nan, "c": math.nan}

    def threshold(self) -> float:
        """``c_t`` at the current step."""
        progress = self.progress()
        return progress * self.lambda1 + (1.0 - progress) * self.lambda2

    def _decide(self, sq_grad_norm: float) -> bool:
        """Update μ and σ with ``s_t`` and compare. σ is kept rather than σ² and updated as
        ``hypot(√δ σ, √(1-δ) (s-μ))``, so that ``(s-μ)²`` cannot overflow for huge (float64) gradients; an
        ``s_t`` that is itself inf (``||g|| > 1.3e154``, a finite gradient) is a SAM step and leaves μ, σ as they are.
        """
        c = self.threshold()
        s = sq_grad_norm
        if math.isinf(s):
            self.last = {"s": s, "mu": self.mean, "sigma": self.sigma, "c": c}
            return True
        if self.step == 0 and self.init == "first":
            self.mean, self.sigma = s, 0.0
        else:
            self.mean = self.delta * self.mean + (1.0 - self.delta) * s
            self.sigma = math.hypot(math.sqrt(self.delta) * self.sigma, math.sqrt(1.0 - self.delta) * (s - self.mean))
        self.last = {"s": s, "mu": self.mean, "sigma": self.sigma, "c": c}
        return s >= self.mean + c * self.sigma

    def statistics(self) -> dict[str, float]:
        return dict(self.last)

    def settings(self) -> dict[str, Any]:
        return {"delta": self.delta, "lambda1": self.lambda1, "lambda2": self.lambda2, "init": self.init}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mean": self.mean, "sigma": self.sigma, "last": dict(self.last)}

    def _state_keys(self) -> tuple[str, ...]:
        return ("mean", "last")

    def _load(self, state: dict[str, Any]) -> None:
        super()._load(state)
        self.mean, self.last = state["mean"], dict(state["last"])
        self.sigma = state["sigma"] if "sigma" in state else math.sqrt(state["var"])  # format 1 saved σ²

    def __repr__(self) -> str:
        return (
            f"Adaptive(delta={self.delta}, lambda1={self.lambda1}, lambda2={self.lambda2}, "
            f"total_steps={self.total_steps}, init={self.init!r})"
        )


class Late(Policy):
    r"""ERM (the base optimizer alone) for the first ``start · T`` steps, then the policy ``then`` (default SAM).

    Zhou et al., "Sharpness-Aware Minimization Efficiently Selects Flatter Minima Late in Training" (ICLR 2025,
    arXiv 2410.10373): SAM applied only in the last part of training reaches nearly the generalisation of SAM
    throughout, at a fraction of the cost. Step ``t`` (counted from 0) is in the late phase iff

        t ≥ t₀ = ⌈start · T⌉          (start ∈ [0, 1]; start = 0: ``then`` throughout, start = 1: ERM for T steps),

    where ``T`` is :attr:`total_steps` (``opt.set_total_steps``, which :class:`sharpness.train.Trainer` calls, or
    ``total_steps=``). Steps beyond ``T`` stay in the late phase. The base optimizer is the same object in both
    phases, so its state (SGD's momentum buffer, Adam's moments) carries over the switch.

    Early steps are decided without the gradient (:attr:`needs_grad_norm` is false there): one forward/backward
    each and no norm computed; under DDP the decision is made before the first pass, which is then all-reduced as
    an SGD step's. In the late phase ``then`` decides as it would alone, on its own step count: it starts at step
    0 at ``t₀`` and its ``total_steps`` (unless given) is the length of the late phase ``T - t₀``, so
    ``Late(start, Adaptive())`` runs AE-SAM's whole threshold schedule ``c_t: λ₂ → λ₁`` inside the late phase and
    seeds its moving averages with the first late ``s_t``. Its state is part of this policy's state (``"then"``).

    >>> policy = Late(0.5, total_steps=4)
    >>> decisions = []
    >>> for _ in range(4):
    ...     decisions.append(policy.decide(float("nan")))
    ...     policy.commit()
    >>> decisions
    [False, False, True, True]
    """

    def __init__(self, start: float, then: Policy | None = None, total_steps: int | None = None) -> None:
        super().__init__()
        self.start = check_real(start, "start", owner="Late", low=0.0, high=1.0, what="fraction of training")
        if then is not None and not isinstance(then, Policy):
            raise TypeError(f"Late: then must be a sharpness.optim.policy.Policy, got {type(then).__name__}")
        self.then = then if then is not None else Always()
        if total_steps is not None:
            self.set_total_steps(total_steps)

    def first_late_step(self) -> int:
        """``t₀ = ⌈start · T⌉`` (a product within 1e-9 of an integer counts as that integer: 0.07 · 100 is 7)."""
        product = self.start * self.planned_steps()
        nearest = round(product)
        return nearest if abs(product - nearest) <= 1e-9 * max(1.0, product) else math.ceil(product)

    def in_late_phase(self) -> bool:
        """Whether the current (next undecided) step is at or after ``t₀``."""
        return self.step >= self.first_late_step()

    @property
    def needs_grad_norm(self) -> bool:  # type: ignore[override]
        return self.in_late_phase() and self.then.needs_grad_norm

    @property
    def replica_consistent(self) -> bool:  # type: ignore[override]
        return self.then.replica_consistent

    @property
    def generator(self) -> torch.Generator | None:
        """``then``'s random generator, if it has one (SAM broadcasts it from rank 0 under DDP)."""
        return getattr(self.then, "generator", None)

    def set_total_steps(self, total_steps: int) -> None:
        """``T``; ``then`` gets the length of the late phase ``T - t₀`` (at least 1) unless it has its own."""
        super().set_total_steps(total_steps)
        if self.then.total_steps is None:
            self.then.set_total_steps(max(self.planned_steps() - self.first_late_step(), 1))

    def _decide(self, sq_grad_norm: float) -> bool:
        return self.in_late_phase() and self.then.decide(sq_grad_norm)

    def commit(self) -> None:
        super().commit()
        self.then.commit()

    def discard(self) -> None:
        self.then.discard()
        super().discard()

    def statistics(self) -> dict[str, float]:
        return self.then.statistics()

    def settings(self) -> dict[str, Any]:
        return {"start": self.start}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "then": self.then.state_dict()}

    def _state_keys(self) -> tuple[str, ...]:
        return ("then",)

    def _load(self, state: dict[str, Any]) -> None:
        super()._load(state)
        self.then.load_state_dict(state["then"])

    def __repr__(self) -> str:
        return f"Late(start={self.start}, then={self.then!r}, total_steps={self.total_steps})"
