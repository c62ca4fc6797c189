"""Momentum-SAM: sharpness-aware training at the cost of SGD, perturbing along the momentum.

Becker, Altrock, Risse, "Momentum-SAM: Sharpness Aware Minimization without Computational Overhead",
arXiv 2401.12033 (2024), Algorithm 1; official code: github.com/MarlonBecker/MSAM, ``optimizer/msam.py`` (SGD)
and ``optimizer/adamW_msam.py`` (AdamW).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from sharpness.checks import check_integer, check_real, is_integer, is_real
from sharpness.optim.buckets import shard_reduce
from sharpness.optim.perturbation import all_finite
from sharpness.optim.sharding import local_shard
from sharpness.optim.snapshot import TensorSnapshot

NORM_EPS = 1e-12
"""Added to ``||v||`` before dividing, as the official code does (so ``v = 0`` gives no perturbation)."""
BASES: dict[str, type[Optimizer]] = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
MOMENTUM_KEYS: tuple[tuple[type[Optimizer], str], ...] = (
    (torch.optim.SGD, "momentum_buffer"),
    (torch.optim.Adam, "exp_avg"),  # torch.optim.AdamW is a subclass
    (torch.optim.AdamW, "exp_avg"),
)
"""The state entry holding the momentum ``v`` of the base optimizers MSAM knows."""


class MSAM(Optimizer):
    r"""Momentum-SAM (Becker et al., 2024, Algorithm 1) around SGD with momentum, AdamW or another base optimizer.

    SAM perturbs the weights along the normalised gradient, which costs a second forward/backward pass. MSAM
    perturbs them along the *negative* normalised momentum ``v`` the base optimizer already keeps, so a step costs
    one pass. In the paper's efficient form (Algorithm 1) the weights sit at the perturbed point between steps::

        w̃_t     = w_t − ρ_t v_t / ||v_t||          (held in the parameters between steps)
        g_t     = ∇L_B(w̃_t)                        (the one forward/backward pass, at w̃_t)
        w_t     = w̃_t + ρ_t v_t / ||v_t||          (undo the perturbation)
        v_{t+1} = μ v_t + g_t;  w_{t+1} = w_t − η v_{t+1}            (the base step: SGD with momentum)
        w̃_{t+1} = w_{t+1} − ρ_{t+1} v_{t+1} / ||v_{t+1}||              (perturb for the next step)

    ``||v||`` is the L2 norm over all parameters (all groups) with a momentum, ``ρ`` may differ per group. On a
    model sharded with FSDP2 (``fully_shard``) each rank moves its shards and ``||v||`` is reduced over the ranks
    (one scalar all-reduce per step): the steps equal a single process's on the whole batch (tested).

    Sign convention, verified against the official ``optimizer/msam.py`` (commit 780fa4f): after the update it
    calls ``param.sub_(buf, alpha=rho / (||buf|| + 1e-12))``, i.e. ``w̃ = w − ρ v/(||v|| + 1e-12)``, and undoes it
    with ``add_`` at the start of the next step. Since SGD moves along ``−v``, the perturbation points the way
    the optimizer is going (the paper: "perturbs parameters in the direction of the accumulated momentum", with
    the Nesterov-style look-ahead being ``−v``, scaled to length ρ instead of η). ``adamW_msam.py`` does the same
    with Adam's first moment ``exp_avg = m`` (its ``(1 − β₁)`` scale cancels in ``m/||m||``). The first step
    has ``v = 0``: no perturbation, as in the official code (which starts from a zero buffer).

    Deviations from the official code, all deliberate:

    - Undoing restores a stored copy of ``w`` (bitwise exact) instead of adding ``ρ v/||v||`` back, so ``w``
      never drifts by rounding, and ρ may change between steps (warm-up, schedules) without the official code's
      mismatch (it undoes with the *new* ρ the perturbation made with the old one). Memory: one copy of the
      perturbed parameters.
    - The base optimizer's weight decay acts on ``w``: SGD's coupled decay adds ``λ w`` (the official code adds
      ``λ w̃``, the gradient is modified before the undo); AdamW's decoupled decay is torch's (decay, then the
      Adam update; the official code updates, then decays).
    - ρ warm-up (``rho_warmup``): ``ρ_t = ρ · min(1, t / W)`` after ``t`` steps, the official ``startRamp`` ρ
      scheduler in steps. With a large ρ (≈ 1) training can stall at chance accuracy without it; a warm-up of
      ~10% of the steps avoids that.
    - A step whose gradient is not finite (inf/NaN) is skipped: weights (still at ``w̃``), momentum and the step
      count are left as they were.

    BatchNorm's running statistics are gathered during the passes at ``w̃`` (the official code refreshes them
    with a forward-only epoch at ``w`` before its final evaluation; this class does not).

    The unperturbed contract: evaluation, checkpoints and measurements must see ``w``. Use :meth:`unperturbed`
    (``with opt.unperturbed(): evaluate(model)``; :class:`sharpness.train.Trainer` does so in ``evaluate``,
    ``final_metrics``, ``state_dict`` and ``load_state_dict``, as does the ``SharpnessTracker``), or
    :meth:`move_to_unperturbed` to leave the weights at ``w`` (e.g. at the end of training). Parameters must not
    be modified in place while perturbed (outside :meth:`unperturbed`); :meth:`step` detects that and raises.
    ``state_dict()`` holds no weights (the momentum, the step count and the warm-up); a resumed run continues
    bit-identically when the model's weights ``w`` are loaded *before* the optimizer state, or inside
    :meth:`unperturbed`: :meth:`load_state_dict` then perturbs the loaded ``w`` with the loaded ``v``.

    Args:
        params: parameters or parameter-group dicts, as for any optimizer (per-group ρ: key ``"msam_rho"``).
        base: ``"sgd"`` (``torch.optim.SGD``; ``momentum`` defaults to 0.9 here), ``"adamw"``
            (``torch.optim.AdamW``), or an optimizer class built as ``base(params, **base_kwargs)``.
        rho: perturbation radius ρ ≥ 0 (official default 0.3 for SGD, 1 for AdamW, 3 in the README's runs).
        rho_warmup: linear ρ warm-up length: an ``int`` number of steps, or a ``float`` fraction in ``[0, 1]`` of
            the run's steps (given by :meth:`set_total_steps`, which the Trainer calls). ``0``: none.
        momentum_key: the base optimizer's state entry holding ``v``; needed only for a class that is not (a
            subclass of) ``SGD``, ``Adam`` or ``AdamW``.
        **base_kwargs: the base optimizer's options (``lr``, ``momentum``, ``betas``, ``weight_decay``, ...).

    Usage: ``opt.step(closure)`` calls the closure once (zero the gradients, forward, backward, return the
    loss: the loss at ``w̃``), or ``loss.backward(); opt.step()``.

    Example (between steps the weights sit at ``w̃``; :meth:`unperturbed` shows ``w``):

    >>> import torch
    >>> from sharpness import MSAM
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = MSAM(model.parameters(), "sgd", rho=0.3, lr=0.1, momentum=0.9)
    >>> for _ in range(2):
    ...     opt.zero_grad()
    ...     model(torch.ones(4, 3)).pow(2).mean().backward()
    ...     opt.step()
    >>> opt.is_perturbed
    True
    >>> with opt.unperturbed():
    ...     w = model.weight.detach().clone()
    >>> bool((w != model.weight).any())
    True
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base: str | type[Optimizer] = "sgd",
        rho: float = 0.3,
        *,
        rho_warmup: int | float = 0,
        momentum_key: str | None = None,
        **base_kwargs: Any,
    ) -> None:
        rho = check_real(rho, "rho", owner="MSAM", low=0.0)
        base_class, self.momentum_key = _resolve_base(base, momentum_key, base_kwargs)
        self.rho_warmup = _check_warmup(rho_warmup)
        super().__init__(params, {"msam_rho": rho})
        self.base_optimizer = base_class(self.param_groups, **base_kwargs)
        # One set of group dicts and one state for both: a scheduler editing either edits both.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        if issubclass(base_class, torch.optim.SGD) and any(g["momentum"] <= 0 for g in self.param_groups):
            raise ValueError("MSAM: the SGD base needs momentum > 0 (MSAM perturbs along it); pass e.g. momentum=0.9")
        self._shard = shard_reduce(self.param_groups)  # FSDP2: ||v|| and finiteness reduced over the ranks
        self.steps = 0
        self.total_steps: int | None = None
        self._snapshot = TensorSnapshot()
        self._perturbed: list[Tensor] = []  # the parameters currently at w̃ (empty: all at w)
        self._versions: list[int] = []  # their version counters right after perturbing
        self._depth = 0  # nesting of unperturbed() blocks
        self._reperturb = False  # whether the outermost unperturbed() block perturbs on leaving

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to MSAM and the base optimizer alike (missing ``msam_rho``: the constructor's ρ)."""
        if "base_optimizer" not in self.__dict__:  # called by Optimizer.__init__ before the base exists
            super().add_param_group(param_group)
            return
        param_group.setdefault("msam_rho", self.defaults["msam_rho"])
        with self.unperturbed():
            self.base_optimizer.add_param_group(param_group)

    # ------------------------------------------------------------------ ρ and its warm-up

    def set_total_steps(self, total_steps: int) -> None:
        """The run's number of steps, for a fractional ``rho_warmup`` (the Trainer calls this before training)."""
        total_steps = check_integer(total_steps, "total_steps", owner="MSAM", low=1)
        with self.unperturbed():  # the current perturbation was made with the old ρ_t
            self.total_steps = total_steps

    def warmup_factor(self) -> float:
        """``min(1, t / W)`` after ``t`` steps for a warm-up of ``W`` steps (1 without warm-up)."""
        if isinstance(self.rho_warmup, float):
            if self.rho_warmup == 0.0:
                return 1.0
            if self.total_steps is None:
                raise RuntimeError(
                    f"MSAM: rho_warmup={self.rho_warmup} is a fraction of the run; call opt.set_total_steps(T) "
                    "first (sharpness.train.Trainer does) or give the warm-up as an int number of steps"
                )
            length = self.rho_warmup * self.total_steps
        else:
            length = self.rho_warmup
        return 1.0 if length == 0 else min(1.0, self.steps / length)

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One MSAM step with the gradient at ``w̃`` (computed by ``closure``, called once, or already in ``.grad``).

        Undoes the perturbation, takes the base optimizer's step and perturbs along the new momentum. A gradient
        that is not finite skips the step (nothing changes). Returns the closure's loss.
        """
        if self._depth:
            raise RuntimeError("MSAM.step() called inside opt.unperturbed(); take steps outside that block")
        self.warmup_factor()  # a missing total step count fails here, before anything changes
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [local_shard(p.grad) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not all_finite(grads, self._shard):
            return loss
        self.move_to_unperturbed()
        self.base_optimizer.step()
        self.steps += 1
        self.perturb()
        return loss

    # ------------------------------------------------------------------ w and w̃

    @property
    def is_perturbed(self) -> bool:
        """Whether the parameters hold ``w̃`` (some parameter is away from ``w``)."""
        return bool(self._perturbed)

    @torch.no_grad()
    def perturb(self) -> None:
        """Move the parameters from ``w`` to ``w̃ = w − ρ_t v/(||v|| + 1e-12)`` (no-op if already perturbed, and
        inside :meth:`unperturbed`, which perturbs on leaving).

        ``w`` is stored first (bitwise), so :meth:`move_to_unperturbed` is exact. Parameters without momentum
        yet (no step taken) stay at ``w``.
        """
        if self._perturbed or self._depth:
            return
        groups = [(group["msam_rho"], self._with_momentum(group)) for group in self.param_groups]
        directions = [v for _, pairs in groups for _, v in pairs]
        if not directions:
            return
        norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(directions))))
        if self._shard is not None:  # this rank's shards only: combine the ranks' norms
            norm = self._shard.norm(norm, 2.0)
        scale = self.warmup_factor() / (norm + NORM_EPS)
        params = [p for _, pairs in groups for p, _ in pairs]
        self._snapshot.save(params)
        for rho, pairs in groups:
            if pairs and rho * scale != 0.0:
                torch._foreach_add_([p for p, _ in pairs], [v for _, v in pairs], alpha=-rho * scale)
        self._perturbed = params
        self._versions = [p._version for p in params]

    @torch.no_grad()
    def move_to_unperturbed(self) -> None:
        """Put the unperturbed weights ``w`` back (copied from the stored ones: bitwise); no-op if at ``w``.

        Raises ``RuntimeError`` if a perturbed parameter was modified in place since :meth:`perturb`.
        """
        if not self._perturbed:
            return
        if self._touched():
            raise RuntimeError(
                "MSAM: parameters were modified in place while perturbed (e.g. model.load_state_dict after "
                "opt.load_state_dict); change the weights inside `with opt.unperturbed():`"
            )
        self._snapshot.restore()
        self._perturbed, self._versions = [], []

    @contextmanager
    def unperturbed(self) -> Iterator[bool]:
        """A block in which the parameters hold the unperturbed weights ``w``; ``w̃`` is rebuilt on leaving.

        Weights changed inside the block (loaded, averaged) become ``w`` and are perturbed on leaving. Blocks
        nest. Yields ``True``: the parameters may change in place on leaving, so tensors that share their memory
        (a model's ``state_dict()``) must be cloned inside the block to be kept.
        """
        outermost = self._depth == 0
        if outermost:
            self._reperturb = self.is_perturbed
            self.move_to_unperturbed()
        self._depth += 1
        try:
            yield True
        finally:
            self._depth -= 1
            if outermost and self._reperturb:
                self.perturb()

    def _with_momentum(self, group: dict[str, Any]) -> list[tuple[Tensor, Tensor]]:
        pairs = []
        for p in group["params"]:
            state = self.state.get(p)
            v = state.get(self.momentum_key) if state else None
            if v is not None:
                pairs.append((local_shard(p), local_shard(v)))
        return pairs

    def _touched(self) -> bool:
        return any(p._version != version for p, version in zip(self._perturbed, self._versions, strict=True))

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """torch's layout (the base optimizer's state: momentum, ...) plus ``"msam"``: step count and warm-up.

        It holds no weights: save the model inside :meth:`unperturbed` (as ``w``).
        """
        state = super().state_dict()
        state["msam"] = {"steps": self.steps, "total_steps": self.total_steps, "rho_warmup": self.rho_warmup}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; the parameters (unless still this optimizer's untouched ``w̃``) are taken
        as ``w`` and perturbed with the loaded momentum and ρ_t (on leaving :meth:`unperturbed` if inside one)."""
        if "msam" not in state_dict:
            raise ValueError("MSAM.load_state_dict: no 'msam' entry; this is not an MSAM state_dict")
        if self._perturbed and self._touched():  # the weights were loaded already: they are w
            self._perturbed, self._versions = [], []
        self.move_to_unperturbed()
        saved = state_dict["msam"]
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "msam"})
        self.base_optimizer.__setstate__({"state": self.state, "param_groups": self.param_groups})
        self.steps, self.total_steps = saved["steps"], saved["total_steps"]
        self.rho_warmup = _check_warmup(saved["rho_warmup"])
        if self._depth:
            self._reperturb = True
        else:
            self.perturb()


def unperturbed_weights(optimizer: Optimizer) -> AbstractContextManager[bool]:
    """``optimizer.unperturbed()`` if it has one (:class:`MSAM`), else a null context yielding ``False``.

    The context yields whether the parameters may change in place on leaving it (then clone what must keep the
    weights, such as a model's ``state_dict()``, inside it).
    """
    context = getattr(optimizer, "unperturbed", None)
    return context() if context is not None else contextlib.nullcontext(False)


def _resolve_base(
    base: str | type[Optimizer], momentum_key: str | None, base_kwargs: dict[str, Any]
) -> tuple[type[Optimizer], str]:
    """The base optimizer class and the state key of its momentum; ``"sgd"`` defaults ``momentum`` to 0.9."""
    if isinstance(base, str):
        if base.lower() not in BASES:
            raise ValueError(f"MSAM: unknown base {base!r}; valid: {', '.join(BASES)}, or an optimizer class")
        if base.lower() == "sgd":
            base_kwargs.setdefault("momentum", 0.9)
        base = BASES[base.lower()]
    if not (isinstance(base, type) and issubclass(base, Optimizer)):
        raise TypeError(f"MSAM: base must be 'sgd', 'adamw' or a torch.optim.Optimizer subclass, got {base!r}")
    if momentum_key is None:
        known = [key for cls, key in MOMENTUM_KEYS if issubclass(base, cls)]
        if not known:
            raise ValueError(
                f"MSAM: which state entry of {base.__name__} holds the momentum? pass momentum_key= (e.g. 'exp_avg')"
            )
        momentum_key = known[0]
    return base, momentum_key


def _check_warmup(value: Any) -> int | float:
    """An ``int`` number of steps >= 0, or a ``float`` fraction of the run in ``[0, 1]``."""
    if is_integer(value):
        return check_integer(value, "rho_warmup", owner="MSAM", low=0, what="warm-up steps")
    if is_real(value) and not math.isnan(value) and 0.0 <= value <= 1.0:
        return float(value)
    raise ValueError(
        f"MSAM: rho_warmup must be an int number of steps >= 0 or a float fraction of the run in [0, 1], got {value!r}"
    )
