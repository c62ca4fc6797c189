"""Policies: whether a SAM step pays for its second (perturbed) pass.

A policy sees, once per step, the squared norm ``s_t = ||g_t||²`` of the first-pass gradient and answers
"SAM step or ERM step". :class:`~sharpness.optim.SAM` asks it before the second pass, so an ERM step costs one
forward/backward. Policies are small state machines whose whole state (step counter, moving averages, random
generator) round-trips through ``state_dict`` so that a resumed run makes the same decisions.

- :class:`Always`: plain SAM (Foret et al., 2021).
- :class:`EveryK`: SAM on steps ``0, k, 2k, ...`` (periodic SAM; LookSAM's schedule, Liu et al., CVPR 2022).
- :class:`Bernoulli`: SAM with probability ``p(t)``, constant or a schedule of training progress (SS-SAM / RST,
  Zhao et al., 2022).
- :class:`Adaptive`: AE-SAM's rule (Jiang, Yang, Zhang, Kwok, ICLR 2023, arXiv 2304.14647, Alg. 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch


class Policy:
    """Decides per step whether to take the SAM (two-pass) step. Subclasses implement :meth:`_decide`."""

    needs_grad_norm = False
    """Whether :meth:`decide` uses ``s_t`` (otherwise the optimizer passes NaN and skips computing it)."""

    def __init__(self) -> None:
        self.step = 0  # decisions taken so far (= optimizer steps)
        self.total_steps: int | None = None

    def decide(self, sq_grad_norm: float) -> bool:
        """The decision for the current step, given ``s_t = ||g_t||²``; advances the step counter."""
        wants = self._decide(sq_grad_norm)
        self.step += 1
        return wants

    def _decide(self, sq_grad_norm: float) -> bool:
        raise NotImplementedError

    def set_total_steps(self, total_steps: int) -> None:
        """The planned training length, for schedules of progress ``t / T`` (the training loop sets it)."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        self.total_steps = total_steps

    def progress(self) -> float:
        """``t / T`` clipped to [0, 1]; needs :attr:`total_steps`."""
        if self.total_steps is None:
            raise ValueError(
                f"{type(self).__name__} needs the training length: pass total_steps=..., or call "
                "opt.set_total_steps(T) before training (sharpness.train.Trainer does this)"
            )
        return min(self.step / self.total_steps, 1.0)

    def statistics(self) -> dict[str, float]:
        """What a training loop may log about the last decision."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.total_steps = state["total_steps"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Always(Policy):
    """Every step is a SAM step: plain SAM."""

    def _decide(self, sq_grad_norm: float) -> bool:
        return True


class EveryK(Policy):
    """SAM on steps ``t ≡ offset (mod k)`` (``offset`` 0: the first step is a SAM step); ERM otherwise."""

    def __init__(self, k: int, offset: int = 0) -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"EveryK: k must be an integer >= 1, got {k!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < k:
            raise ValueError(f"EveryK: offset must be an integer in [0, k), got {offset!r}")
        self.k, self.offset = k, offset

    def _decide(self, sq_grad_norm: float) -> bool:
        return self.step % self.k == self.offset

    def __repr__(self) -> str:
        return f"EveryK(k={self.k}, offset={self.offset})"


class Bernoulli(Policy):
    """SAM with probability ``p`` (a number), or ``p(t/T)`` (a callable of training progress in [0, 1]).

    Draws come from the policy's own ``torch.Generator`` (seeded by ``seed``, saved in ``state_dict``), never from
    the global random state, so the training run's other randomness is unaffected.
    """

    def __init__(self, p: float | Callable[[float], float], seed: int = 0) -> None:
        super().__init__()
        if not callable(p):
            self._check_probability(p)
        self.p = p
        self.generator = torch.Generator().manual_seed(seed)
        self.last_p = math.nan

    @staticmethod
    def _check_probability(p: Any) -> float:
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
            raise ValueError(f"Bernoulli: the probability must be a number in [0, 1], got {p!r}")
        return float(p)

    def _decide(self, sq_grad_norm: float) -> bool:
        self.last_p = self._check_probability(self.p(self.progress()) if callable(self.p) else self.p)
        return bool(torch.rand((), generator=self.generator) < self.last_p)

    def statistics(self) -> dict[str, float]:
        return {"p": self.last_p}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state(), "last_p": self.last_p}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
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
        if not (isinstance(delta, int | float) and 0.0 <= delta < 1.0):
            raise ValueError(f"Adaptive: delta must be in [0, 1), got {delta!r}")
        for name, value in (("lambda1", lambda1), ("lambda2", lambda2)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"Adaptive: {name} must be a finite number, got {value!r}")
        if init not in ("first", "zero"):
            raise ValueError(f"Adaptive: init must be 'first' or 'zero', got {init!r}")
        self.delta, self.lambda1, self.lambda2, self.init = float(delta), float(lambda1), float(lambda2), init
        if total_steps is not None:
            self.set_total_steps(total_steps)
        self.mean = 0.0
        self.var = 0.0
        self.last = {"s": math.nan, "mu": math.nan, "sigma": math.nan, "c": math.nan}

    def threshold(self) -> float:
        """``c_t`` at the current step."""
        progress = self.progress()
        return progress * self.lambda1 + (1.0 - progress) * self.lambda2

    def _decide(self, sq_grad_norm: float) -> bool:
        c = self.threshold()
        s = sq_grad_norm
        if self.step == 0 and self.init == "first":
            self.mean, self.var = s, 0.0
        else:
            self.mean = self.delta * self.mean + (1.0 - self.delta) * s
            self.var = self.delta * self.var + (1.0 - self.delta) * (s - self.mean) ** 2
        sigma = math.sqrt(self.var)
        self.last = {"s": s, "mu": self.mean, "sigma": sigma, "c": c}
        return s >= self.mean + c * sigma

    def statistics(self) -> dict[str, float]:
        return dict(self.last)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mean": self.mean, "var": self.var, "last": dict(self.last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.mean, self.var, self.last = state["mean"], state["var"], dict(state["last"])

    def __repr__(self) -> str:
        return (
            f"Adaptive(delta={self.delta}, lambda1={self.lambda1}, lambda2={self.lambda2}, "
            f"total_steps={self.total_steps}, init={self.init!r})"
        )
