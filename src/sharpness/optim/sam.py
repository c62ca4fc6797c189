"""SAM: Sharpness-Aware Minimization as a wrapper around any ``torch.optim.Optimizer``.

Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving Generalization",
ICLR 2021, arXiv 2010.01412, Algorithm 1; ASAM: Kwon, Kim, Park, Choi, ICML 2021, arXiv 2102.11600.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from sharpness.optim import amp
from sharpness.optim.ascent import DualNormMap, Perturbation, ascent_input, flags_of, is_plain_gradient, move
from sharpness.optim.batchnorm import BatchNormStatsGuard
from sharpness.optim.buckets import (
    Bucket,
    BucketCache,
    all_gradients,
    first_nonempty_gradient,
    flat_gradients,
    held_gradients,
    shard_reduce,
)
from sharpness.optim.checkpoint import load_sam_state, split_state_dict, state_dict_of
from sharpness.optim.distributed import EpsilonFrom, ReplicaSync, replica_sync
from sharpness.optim.groups import common_p, defaults_of, fill_group, reject_bare_options
from sharpness.optim.m_sharpness import micro_batch_step
from sharpness.optim.perturbation import all_finite, global_norm
from sharpness.optim.policy import Always, Policy
from sharpness.optim.reuse import LookSAMReuse
from sharpness.optim.snapshot import TensorSnapshot

Closure = Callable[[], Any]
_eager = torch._disable_dynamo
"""SAM's steps run eagerly under ``torch.compile`` (dynamo is disabled inside them): they make host decisions
(finiteness, the policy) on every step. Compile the model instead; its forward/backward passes are compiled."""
Phase = Literal["idle", "perturbed", "restored", "skipped", "erm"]


class SAM(Optimizer):
    r"""Sharpness-Aware Minimization around a base optimizer (Foret et al., 2021, Algorithm 1).

    Each step solves the inner problem of ``min_w max_{||ε||_p ≤ ρ} L(w + ε)`` to first order,

        ε̂ = ρ · sign(g) |g|^{q-1} / ||g||_q^{q-1}      (1/p + 1/q = 1;  p = 2: ε̂ = ρ g / ||g||_2),

    evaluates the gradient again at ``w + ε̂`` on the same batch, restores ``w`` and lets the base optimizer
    step with that gradient. ``g`` is the gradient of all parameters that have one, across all groups, so the
    norm is global; ``ρ`` may differ per group (each group's ε is its slice of the unit direction times its ρ).
    For a group whose base optimizer has ``maximize=True`` the objective is ``-L``: ε̂ is built from ``-g``.
    Complex parameters count as pairs of real coordinates. Groups with ``perturb=False`` (key ``"sam_perturb"``)
    are left out of ``g`` for ε (SAM-ON: :func:`sharpness.optim.perturb_subset`); policies still see the whole
    gradient's ``||g||²``.

    With ``adaptive=True`` this is ASAM (Kwon et al., 2021): the ball is taken in the coordinates
    ``T_w^{-1} ε`` with ``T_w = |w| + eta`` element-wise, so ``ε̂ = ρ T_w² g / ||T_w g||`` for ``p = 2``.
    ``adaptive_scope="weights"`` (default, the official ASAM code's behaviour) rescales only weight tensors,
    taken here as tensors with ``ndim >= 2``; biases and 1-D normalisation parameters use ``T = 1``. The
    official code selects by the parameter name containing ``"weight"``, which also rescales BatchNorm's
    ``γ``; ``adaptive_scope="all"`` rescales every tensor. davda54/sam's ``adaptive=True`` is
    ``adaptive_scope="all", eta=0``.

    Args:
        params: parameters, ``named_parameters()`` or parameter-group dicts, as for any optimizer. With an
            already-built ``base_optimizer`` pass ``None`` (or exactly that optimizer's parameters).
        base_optimizer: an optimizer class (or any callable returning an optimizer), built as
            ``base_optimizer(self.param_groups, **base_kwargs)``, or an already-built optimizer instance.
        rho: perturbation radius ρ ≥ 0 (per-group key ``"sam_rho"``).
        adaptive: ASAM's scale-invariant ball (per-group key ``"sam_adaptive"``).
        p: norm of the ball, ``1 <= p <= math.inf`` (default 2; key ``"sam_p"``). The same in every group.
        eta: ASAM's offset in ``T_w = |w| + eta`` (default 0.01; key ``"sam_eta"``).
        adaptive_scope: ``"weights"`` or ``"all"``: which tensors ASAM rescales (key ``"sam_adaptive_scope"``).
        include_weight_decay: build ε from ``g + λ w`` with the group's ``weight_decay`` λ, as the JAX
            implementation does (there weight decay is part of the loss). Default ``False``: ε comes from the
            loss gradient alone, as in the PyTorch implementations; the base optimizer applies its weight decay
            either way (key ``"sam_include_weight_decay"``).
        perturb: whether ε includes the group's parameters (key ``"sam_perturb"``, default ``True``). Groups with
            ``False`` are left out of ε *and* of its norm: ``ε = ρ g_S / ||g_S||`` on the perturbed set ``S``, zero
            elsewhere (SAM-ON, Mueller et al., NeurIPS 2023, arXiv 2306.04226). Their gradient is still computed
            at ``w + ε`` and stepped by the base optimizer. :func:`sharpness.optim.perturb_subset` splits a model's
            groups this way (e.g. only normalisation layers' affine parameters).
        perturbation: the ascent step as one object, :class:`sharpness.optim.ascent.Perturbation` (gradient →
            ASAM scaling → dual-norm map → parameter subset), e.g. ``ascent.chain(ascent.ASAMScaling(0.0, "all"),
            ascent.DualNormMap(float("inf")))``. The flags ``adaptive``, ``p``, ``eta``, ``adaptive_scope`` and
            ``include_weight_decay`` are its shorthand: give one or the other. A :class:`~sharpness.optim.ascent.
            ParameterSubset` other than ``"all"`` needs ``model`` and splits the groups as
            :func:`sharpness.optim.perturb_subset` does. Stored, like the flags, in the groups' ``sam_`` keys.
        model: if given, normalisation layers' running statistics are kept out of the perturbed pass
            automatically (see :func:`sharpness.frozen_bn`).
        policy: whether a step takes the second pass (:mod:`sharpness.optim.policy`; default :class:`Always`,
            plain SAM). Steps the policy declines are ERM steps: one forward/backward and the base step.
        reuse: what an ERM step does with stored SAM information (default ``None``: the plain gradient;
            :class:`~sharpness.optim.reuse.LookSAMReuse`: LookSAM's reuse of ``g_v``).
        epsilon_from: with ``model`` a :class:`~torch.nn.parallel.DistributedDataParallel` module,
            ``"replica"`` (default): each replica perturbs with its own gradient, the first pass runs under
            ``model.no_sync()`` and a SAM step all-reduces the gradients once (the paper's m-sharpness with m =
            the per-replica batch); ``"global"``: the first gradient is all-reduced too (two all-reduces) and
            every replica perturbs with the global gradient. See ``docs/distributed.md``.
        **base_kwargs: passed to ``base_optimizer`` when it is a class (``lr``, ``momentum``, ...).

    SAM's settings live in the shared parameter groups under a ``sam_`` prefix (``group["sam_rho"]``), so they
    never collide with a base optimizer's own options (Adadelta's ``rho``).

    Three equivalent ways to take a step::

        # 1. closure (torch convention: the closure computes the loss and calls backward; SAM zeroes the
        #    gradients before each call). It is called twice: at w, then at w + ε.
        def closure():
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        loss = opt.step(closure)

        # 2. two steps (davda54/sam's API); with a switching policy ask opt.wants_sam_step() first
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

        # 3. context manager: the weights are restored on leaving the block, even on an exception
        loss_fn(model(x), y).backward()
        with opt.perturbed():
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)  # or opt.step(), or scaler.step(opt)

    Guarantees. Restoring copies the saved weights back (bitwise exact); it never subtracts ε. A gradient that is
    not finite (inf/NaN, e.g. an fp16 overflow) in *either* pass skips the whole step: the weights are restored
    bitwise, and the base optimizer's state, LookSAM's ``g_v``, the policy and the step counters are left as if
    the step had not been tried (with a ``GradScaler`` the scaler sees the inf and backs off once). Policies see
    statistics of the unscaled gradient. Optimizer hooks (``register_step_pre_hook`` / ``post_hook``, state-dict
    hooks) run as for a torch optimizer, in every API: the step hooks run around the base optimizer's step.
    ``state_dict`` has torch's layout (``state``, ``param_groups``) plus SAM's own state under ``"sam"``, and a
    resumed run continues bit-identically. See ``docs/sam.md``.

    Example (a closure step: two forward/backward passes, the weights restored bitwise between them):

    >>> import torch
    >>> from sharpness import SAM
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
    >>> def closure():
    ...     loss = torch.nn.functional.mse_loss(model(x), y)
    ...     loss.backward()
    ...     return loss
    >>> loss = opt.step(closure)
    >>> opt.steps, opt.sam_steps, opt.is_perturbed
    (1, 1, False)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]] | None,
        base_optimizer: type[Optimizer] | Callable[..., Optimizer] | Optimizer,
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        p: float = 2.0,
        eta: float = 0.01,
        adaptive_scope: Literal["weights", "all"] = "weights",
        include_weight_decay: bool = False,
        perturb: bool = True,
        perturbation: Perturbation | None = None,
        model: nn.Module | None = None,
        policy: Policy | None = None,
        reuse: LookSAMReuse | None = None,
        epsilon_from: EpsilonFrom = "replica",
        **base_kwargs: Any,
    ) -> None:
        flags = {"adaptive": adaptive, "p": p, "eta": eta, "adaptive_scope": adaptive_scope}
        flags = flags_of(perturbation, {**flags, "include_weight_decay": include_weight_decay})
        defaults = defaults_of(rho=rho, perturb=perturb, **flags)
        if perturbation is not None:
            params = _split_for_subset(params, base_optimizer, perturbation, model)
        self.base_optimizer = self._build_base(params, base_optimizer, defaults, base_kwargs)
        self._adopt_base_groups()
        for group in self.param_groups:
            reject_bare_options(group, self.base_optimizer.defaults, type(self.base_optimizer).__name__)
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"SAM: policy must be a sharpness.optim.policy.Policy, got {type(policy).__name__}")
        if reuse is not None and not isinstance(reuse, LookSAMReuse):
            raise TypeError(f"SAM: reuse must be None or a LookSAMReuse, got {type(reuse).__name__}")
        self.policy = policy if policy is not None else Always()
        self.reuse = reuse
        self._shard = shard_reduce(self.param_groups)  # FSDP2: reductions over the ranks holding the shards
        self._phase: Phase = "idle"
        self.attach_model(model, epsilon_from)
        self._snapshots: dict[tuple[Any, ...], TensorSnapshot] = {}
        self._bucket_cache = BucketCache()
        self._decision: bool | None = None  # the policy's answer for the current step, once asked
        self._grad_norm: float | None = None  # ||g||_2 of the current step's first gradient, unscaled, once known
        self._via_scaler = False  # step() is being called by GradScaler.step, which checked finiteness
        self._warned_bypass = False
        self.last_grad_norm: float = math.nan
        """Dual norm ``||g||_q`` (of ``T_w g`` for ASAM) of the gradient seen by the last :meth:`first_step`, over
        the perturbed groups (``sam_perturb``), loss scale removed; inf/NaN if that gradient was not finite."""
        self.steps = 0  # optimizer steps taken (SAM and ERM)
        self.sam_steps = 0  # of which SAM (two-pass) steps

    def _build_base(
        self, params: Any, base_optimizer: Any, defaults: dict[str, Any], base_kwargs: dict[str, Any]
    ) -> Optimizer:
        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    f"SAM: keyword arguments {sorted(base_kwargs)} configure a base optimizer class, but an "
                    "already-built optimizer was given; set them on that optimizer instead"
                )
            if params is not None and _param_ids(params) != _param_ids(base_optimizer.param_groups):
                raise ValueError("SAM: params must be the parameters of the given base optimizer instance (or None)")
            super().__init__(base_optimizer.param_groups, defaults)
            return base_optimizer
        if not callable(base_optimizer):
            raise TypeError(
                "SAM: base_optimizer must be an optimizer class such as torch.optim.SGD, or an optimizer "
                f"instance, got {base_optimizer!r}"
            )
        if params is None:
            raise TypeError("SAM: params is required when base_optimizer is a class")
        super().__init__(params, defaults)
        base = base_optimizer(self.param_groups, **base_kwargs)
        if not isinstance(base, Optimizer):
            raise TypeError(f"SAM: base_optimizer must build a torch.optim.Optimizer, got {type(base).__name__}")
        return base

    def attach_model(self, model: nn.Module | None, epsilon_from: EpsilonFrom = "replica") -> None:
        """Give SAM the model it trains, as the constructor's ``model=`` and ``epsilon_from=`` do, after construction.

        For frameworks that wrap the model in :class:`~torch.nn.parallel.DistributedDataParallel` after the
        optimizer is built (Lightning: :class:`sharpness.integrations.lightning.SAMCallback`). Replaces the model
        given before; ``None`` detaches it. Not allowed in the middle of a step.
        """
        if self._phase != "idle":
            raise RuntimeError("SAM.attach_model() called in the middle of a step; call it between steps")
        sync = self._replica_sync(model, epsilon_from)
        if self._shard is not None and sync is not None:
            raise ValueError(
                "SAM: a DistributedDataParallel model with sharded (fully_shard) parameters is not supported"
            )
        self._sync = sync
        # whether the current first gradient is this replica's own (not all-reduced): the two-step API's contract
        self._first_pass_local = self._sync is not None and self._sync.local_first_pass
        self._bn_guard = BatchNormStatsGuard(model) if model is not None else None

    def _replica_sync(self, model: nn.Module | None, epsilon_from: EpsilonFrom) -> ReplicaSync | None:
        """Data parallelism (``model`` a DDP module): check the policy can stay consistent, share its randomness."""
        sync = replica_sync(model, epsilon_from)
        if sync is None:
            return None
        if not self.policy.replica_consistent:
            raise ValueError(
                f"SAM: the {type(self.policy).__name__} policy does not declare replica_consistent = True; under "
                "DistributedDataParallel replicas that decide differently would hang in a collective. Set the "
                "class attribute once its decisions depend only on its state and the global s_t"
            )
        generator = getattr(self.policy, "generator", None)
        if isinstance(generator, torch.Generator):
            sync.broadcast_generator(generator)
        return sync

    def _adopt_base_groups(self) -> None:
        # One set of group dicts for both objects: a scheduler or a user editing either one edits both.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to SAM and the base optimizer alike (SAM's defaults fill missing ``sam_`` keys)."""
        if "base_optimizer" not in self.__dict__:  # called by Optimizer.__init__ before the base exists
            super().add_param_group(param_group)
            return
        reject_bare_options(param_group, self.base_optimizer.defaults, type(self.base_optimizer).__name__)
        self.base_optimizer.add_param_group(param_group)
        fill_group(param_group, self.defaults)
        self._shard = shard_reduce(self.param_groups)

    @property
    def is_perturbed(self) -> bool:
        """True between :meth:`first_step` and :meth:`restore` / :meth:`second_step`."""
        return self._phase == "perturbed"

    # ------------------------------------------------------------------ gradients

    def _buckets(self) -> list[Bucket]:
        return self._bucket_cache.collect(self.param_groups, self.defaults)

    def _require_buckets(self, caller: str) -> list[Bucket]:
        buckets = self._buckets()
        if not buckets and (self._shard is None or not held_gradients(self.param_groups)):
            raise RuntimeError(
                f"SAM.{caller}(): no parameter has a gradient. Call loss.backward() first; "
                "check that the loss depends on the optimised parameters"
            )
        return buckets

    def _first_grad_norm(self, buckets: list[Bucket], loss_scale: float) -> float:
        """``||g||_2`` of the current step's first gradient with the loss scale removed (computed once a step).

        After a per-replica first pass it is global, from one scalar all-reduce: the root mean square of the
        replicas' norms (inf/NaN on any replica make it inf/NaN on all, so they all skip the step).
        """
        if self._grad_norm is None:
            norm = global_norm(all_gradients(buckets), 2.0, self._shard) / loss_scale
            if self._replica_local():
                norm = math.sqrt(self._sync.mean(norm * norm, like=buckets[0].grads[0]))
            self._grad_norm = norm
        return self._grad_norm

    def _replica_local(self) -> bool:
        """Whether the held first gradient is this replica's own, so that statistics of it need a collective."""
        return self._sync is not None and self._first_pass_local

    def _average_local_gradients(self, buckets: list[Bucket]) -> None:
        """An ERM step after a per-replica first pass: the gradient is averaged over replicas here."""
        if self._replica_local():
            self._sync.average(flat_gradients(buckets))

    def _first_gradient_finite(self, buckets: list[Bucket]) -> bool:
        """Whether the current step's first gradient is finite on every replica (its norm says so, when known)."""
        if self._grad_norm is not None or self._replica_local():
            return math.isfinite(self._first_grad_norm(buckets, 1.0))
        return all_finite(flat_gradients(buckets), self._shard)

    def _begin_step(self) -> None:
        """A new step starts: a previous one that was never finished (e.g. a GradScaler skipped it) is dropped."""
        if self._phase in ("restored", "skipped", "erm"):
            self._skip(None)

    # ------------------------------------------------------------------ policies: SAM or ERM step

    def _decide(self, buckets: list[Bucket], loss_scale: float) -> bool:
        """Ask the policy once for this step; a non-finite gradient never reaches it (the step is skipped)."""
        s = math.nan
        if self.policy.needs_grad_norm:
            norm = self._first_grad_norm(buckets, loss_scale)
            if not math.isfinite(norm):  # first_step / erm_step will skip this step
                self._decision = False
                return False
            s = norm * norm
        self._decision = self.policy.decide(s)
        return self._decision

    @_eager
    @torch.no_grad()
    def wants_sam_step(self, *, scaler: torch.amp.GradScaler | None = None) -> bool:
        """Whether this step should take the second pass, per the policy; call after the first backward.

        The answer is computed once per step (the policy's state advances tentatively; it is kept when the step
        is taken, rolled back when it is skipped) and repeated until the step is finished. Pass the ``scaler``
        whose loss scale the gradients carry: the policy sees the unscaled ``||g||²``. Two-step usage::

            loss_fn(model(x), y).backward()
            if opt.wants_sam_step():
                opt.first_step(zero_grad=True)
                loss_fn(model(x), y).backward()
                opt.second_step(zero_grad=True)
            else:
                opt.erm_step(zero_grad=True)
        """
        self._begin_step()
        if self._decision is None:
            self._decide(self._require_buckets("wants_sam_step"), amp.loss_scale(scaler, self))
        return bool(self._decision)

    def set_total_steps(self, total_steps: int) -> None:
        """Tell the policy the planned number of steps (for schedules of progress), unless it was given one."""
        if self.policy.total_steps is None:
            self.policy.set_total_steps(total_steps)

    def statistics(self) -> dict[str, float]:
        """Steps, SAM steps, SAM fraction and the policy's last figures (``s``, ``mu``, ``sigma``, ``c`` or ``p``)."""
        fraction = self.sam_steps / self.steps if self.steps else math.nan
        return {"steps": self.steps, "sam_steps": self.sam_steps, "sam_fraction": fraction, **self.policy.statistics()}

    # ------------------------------------------------------------------ the perturbation

    @_eager
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, scaler: torch.amp.GradScaler | None = None) -> bool:
        """Move the weights to ``w + ε̂`` computed from the gradients they hold now.

        Returns ``True`` when perturbed. Returns ``False``, changing nothing at all (weights, gradients, even
        with ``zero_grad=True``), when the gradient is not finite: the caller should skip the second pass;
        :meth:`second_step` will then skip the base step. Pass the ``scaler`` whose loss scale the gradients
        carry (needed for the policy's statistics and for ``include_weight_decay=True``). A zero gradient gives
        ``ε̂ = 0``: the weights stay where they are.
        """
        if self._phase == "perturbed":
            raise RuntimeError(
                "SAM.first_step() called while the weights are already perturbed; call second_step() or restore() first"
            )
        self._begin_step()
        buckets = self._require_buckets("first_step")
        loss_scale = amp.loss_scale(scaler, self)
        if self._decision is None:
            self._warn_policy_bypassed()
            self._decide(buckets, loss_scale)
        if not self._perturb(buckets, loss_scale):
            self._phase = "skipped"
            return False
        self._phase = "perturbed"
        if zero_grad:
            self.zero_grad()
        return True

    def _warn_policy_bypassed(self) -> None:
        if not isinstance(self.policy, Always) and not self._warned_bypass:
            self._warned_bypass = True
            warnings.warn(
                f"SAM.first_step() was called without asking wants_sam_step(): every step becomes a SAM step and "
                f"the {type(self.policy).__name__} policy is bypassed. Ask `if opt.wants_sam_step():` first and "
                "call opt.erm_step() otherwise, or use opt.step(closure)",
                UserWarning,
                stacklevel=_user_stacklevel(),
            )

    def _perturb(self, buckets: list[Bucket], loss_scale: float) -> bool:
        """``w ← w + ε̂`` on the groups with ``sam_perturb`` (weights saved first); ``ε̂`` and its norm are those of
        the gradient restricted to them. ``False``, changing nothing, when the gradient is not finite (anywhere)."""
        if self._replica_local() and not math.isfinite(self._first_grad_norm(buckets, loss_scale)):
            return False  # not finite on some replica: every replica skips
        ball = DualNormMap(common_p(self.param_groups))
        perturbed = [bucket for bucket in buckets if bucket.group["sam_perturb"]]
        # h = g on every bucket: ||h|| is ||g||, which the policy may have measured already and LookSAM needs
        h_is_g = ball.p == 2 and len(perturbed) == len(buckets) and all(map(is_plain_gradient, buckets))
        hs, norm, divisor = self._ascent_inputs(perturbed, loss_scale, ball, h_is_g)
        self.last_grad_norm = norm * divisor / loss_scale
        if not (math.isfinite(norm) and self._unperturbed_gradient_finite(buckets)):
            return False
        if self.reuse is not None:
            g_norm = norm if h_is_g and divisor == 1.0 else None
            self.reuse.save_first_gradient([b.owners for b in buckets], all_gradients(buckets), g_norm)
        if norm > 0.0:
            directions, coefficient = ball.direction(hs, norm, self._shard)
            snapshots = [self._snapshot_for(bucket) for bucket in perturbed]
            try:
                for bucket, direction in zip(perturbed, directions, strict=True):
                    move(bucket, direction, coefficient)
            except BaseException:
                for snapshot in snapshots:
                    snapshot.restore()
                raise
        if self._bn_guard is not None:
            self._bn_guard.save()
        return True

    def _unperturbed_gradient_finite(self, buckets: list[Bucket]) -> bool:
        """Whether the first gradient is finite outside the perturbed groups too (the norm of ε covers only them)."""
        if all(group["sam_perturb"] for group in self.param_groups) or self._replica_local():
            return True  # the norm covered every gradient, or every replica's norm was checked already
        rest = [bucket for bucket in buckets if not bucket.group["sam_perturb"]]
        return all_finite(flat_gradients(rest), self._shard)

    def _ascent_inputs(
        self, buckets: list[Bucket], loss_scale: float, ball: DualNormMap, h_is_g: bool = False
    ) -> tuple[list[list[Tensor]], float, float]:
        """``(h, ||h||_q, d)`` with ``h = T_w (±g + λ w) / d`` per bucket; ``d = 1`` unless ``h`` overflowed.

        ``ε̂`` is homogeneous of degree 0 in ``h``, so when the products overflow for a finite gradient
        (a huge ``T_w g``) ``h`` is rebuilt from ``g / max|g|`` (``d = max|g|``). ``h_is_g``: ``h`` is the whole
        gradient and ``p = 2``, so the policy's ``||g||`` (this replica's, without a loss scale) is ``||h||``.
        """
        hs = [ascent_input(bucket, loss_scale, 1.0) for bucket in buckets]
        known = h_is_g and loss_scale == 1.0 and self._grad_norm is not None and not self._replica_local()
        norm = self._grad_norm if known else ball.norm(hs, self._shard)
        if math.isfinite(norm):
            return hs, norm, 1.0
        divisor = global_norm(all_gradients(buckets), math.inf, self._shard)
        if not math.isfinite(divisor) or divisor == 0.0:
            return hs, norm, 1.0  # the gradient itself is not finite
        hs = [ascent_input(bucket, loss_scale, divisor) for bucket in buckets]
        return hs, ball.norm(hs, self._shard), divisor

    def _snapshot_for(self, bucket: Bucket) -> TensorSnapshot:
        snapshot = self._snapshots.get(bucket.key)
        if snapshot is None:
            snapshot = self._snapshots[bucket.key] = TensorSnapshot()
        snapshot.save(bucket.params)
        return snapshot

    @_eager
    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved weights (and BN statistics, when SAM has the model) back; no-op if not perturbed."""
        if self._phase != "perturbed":
            return
        for snapshot in self._snapshots.values():
            snapshot.restore()
        if self._bn_guard is not None:
            self._bn_guard.restore()
        self._phase = "restored"

    @contextmanager
    def perturbed(self, zero_grad: bool = True, *, scaler: torch.amp.GradScaler | None = None) -> Iterator[bool]:
        """``first_step`` on entry and :meth:`restore` on exit, even if the body raises.

        Yields whether the weights were perturbed (``False``: non-finite gradient, skip the second pass).
        Finish the step after the block with :meth:`second_step`, ``opt.step()`` or ``scaler.step(opt)``.
        """
        applied = self.first_step(zero_grad=zero_grad, scaler=scaler)
        try:
            yield applied
        except BaseException:
            self._abandon_step()
            raise
        self.restore()

    def _abandon_step(self) -> None:
        """After an exception in the perturbed pass: weights restored, no base step, the policy rolled back."""
        self.restore()
        self._skip(None)

    def discard_step(self) -> None:
        """Drop the current step if one is unfinished: weights restored, no base step, the policy rolled back.

        A no-op between finished steps. For loops in which ``scaler.step(opt)`` may skip ``step()`` (inf/NaN
        gradients) after :meth:`wants_sam_step` answered ``False``: SAM cannot tell that step from the next one, so
        call this before the next step's :meth:`wants_sam_step` (a SAM step left open is dropped automatically).
        """
        if self._phase != "idle" or self._decision is not None:
            self._abandon_step()

    # ------------------------------------------------------------------ finishing a step

    @_eager
    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, scaler: torch.amp.GradScaler | None = None) -> None:
        """Restore ``w`` and take the base optimizer's step with the gradient computed at ``w + ε̂``.

        A gradient at ``w + ε̂`` that is not finite skips the step (no base step, state untouched). With a
        ``scaler`` the base step goes through ``scaler.step(opt)``, which unscales the gradients (unless
        ``scaler.unscale_(opt)`` already did, e.g. for clipping) and skips the step when they hold inf/NaN;
        call ``scaler.update()`` afterwards as usual. After a skipped :meth:`first_step` no base step is taken
        (with a scaler, one gradient entry is set to NaN so that the scaler skips too and lowers its scale).
        """
        if self._phase in ("idle", "erm"):
            raise RuntimeError("SAM.second_step() called without first_step(); call first_step() first")
        self.restore()
        if self._phase == "skipped":
            self._skip(scaler)
        else:
            self._base_step(scaler)
        if zero_grad:
            self.zero_grad()

    @_eager
    @torch.no_grad()
    def erm_step(self, zero_grad: bool = False, *, scaler: torch.amp.GradScaler | None = None) -> None:
        """An ERM step: the base optimizer's step on the current gradient (with the ``reuse`` rule applied).

        The weights are not perturbed and no second pass is needed. A gradient that is not finite skips the
        step, as in :meth:`first_step` (with a ``scaler``, the scaler skips too and backs off its scale).
        """
        if self._phase == "perturbed":
            raise RuntimeError("SAM.erm_step() called while perturbed; finish the SAM step with second_step()")
        self._begin_step()
        buckets = self._require_buckets("erm_step")
        loss_scale = amp.loss_scale(scaler, self)
        if self._decision is None:
            self._decide(buckets, loss_scale)
        if self._first_gradient_finite(buckets):
            self._average_local_gradients(buckets)
            self._phase = "erm"
            self._base_step(scaler)
        else:
            self._skip(scaler)
        if zero_grad:
            self.zero_grad()

    def _base_step(self, scaler: torch.amp.GradScaler | None) -> None:
        """Finish the pending SAM or ERM step through :meth:`step` (so step hooks run), or ``scaler.step(self)``."""
        if not amp.is_active(scaler):
            self.step()
            return
        amp.adopt_unscale(scaler, self, self.base_optimizer)
        self._via_scaler = True
        try:
            scaler.step(self)
        finally:
            self._via_scaler = False
        if self._phase in ("restored", "erm"):  # the scaler found inf/NaN and did not call step()
            self._skip(None)

    def _finish_sam_step(self, check_finite: bool) -> None:
        if check_finite and not self._second_gradient_finite():
            self._skip(None)
            return
        if self.reuse is not None:
            buckets = self._buckets()
            self.reuse.update([b.owners for b in buckets], all_gradients(buckets), self._shard)
            if self._replica_local():  # g_v came from this replica's g: the replicas' mean keeps them equal
                self.reuse.average_over_replicas(self._sync.average)
        self.base_optimizer.step()
        self._count_step(sam=True)

    def _second_gradient_finite(self) -> bool:
        """Whether the gradient at ``w + ε`` is finite (on every rank's shard, for sharded parameters)."""
        if self._shard is None:
            return all_finite(held_gradients(self.param_groups))
        return all_finite(flat_gradients(self._buckets()), self._shard)

    def _finish_erm_step(self, buckets: list[Bucket] | None = None, g_norm: float | None = None) -> None:
        if self.reuse is not None:
            buckets = buckets if buckets is not None else self._buckets()
            self.reuse.apply([b.owners for b in buckets], all_gradients(buckets), self._shard, g_norm=g_norm)
        self.base_optimizer.step()
        self._count_step(sam=False)

    def _count_step(self, sam: bool) -> None:
        self.policy.commit()
        self.steps += 1
        self.sam_steps += sam
        # Tell a torch LR scheduler wrapping self.step that an optimizer step happened (it checks this flag).
        self._opt_called = True
        self._end_step()

    def _skip(self, scaler: torch.amp.GradScaler | None) -> None:
        """Drop the current step: no base step; the policy and LookSAM's saved gradient are rolled back.

        With a ``scaler``, one gradient entry is set to NaN and the scaler is stepped, so that it skips too and
        backs off its scale (it would otherwise step on gradients SAM refused, e.g. after a skipped first pass).
        """
        self.policy.discard()
        if self.reuse is not None:
            self.reuse.discard_first_gradient()
        self._end_step()
        if amp.is_active(scaler):
            grad = first_nonempty_gradient(self.param_groups)
            if grad is not None:
                grad[(0,) * grad.ndim] = math.nan
            scaler.step(self)

    def _end_step(self) -> None:
        self._phase = "idle"
        self._decision = self._grad_norm = None
        self._first_pass_local = self._sync is not None and self._sync.local_first_pass

    # ------------------------------------------------------------------ step()

    @_eager
    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:  # type: ignore[override]
        """One SAM step with a closure that computes the loss and calls ``backward()``; returns the loss at w.

        The gradients are zeroed before each of the two closure calls. On an exception in the second call the
        weights are restored before it propagates, and no base step is taken.

        Without a closure, ``step()`` finishes a step whose passes were run outside: after the perturbed pass
        (``with opt.perturbed(): ...``) it is :meth:`second_step`; this is also what ``scaler.step(opt)`` calls.
        After :meth:`wants_sam_step` answered ``False`` it is :meth:`erm_step` (for loops that call ``step()`` or
        ``scaler.step(opt)`` themselves, such as ``transformers.Trainer``'s).
        With every gradient exactly zero it runs the base optimizer's step alone (ε̂ = 0, so this *is* the SAM
        step; ``torch.distributed.checkpoint`` initialises optimizer state this way) without counting a step.
        Otherwise it is an error: SAM cannot take a step from one gradient.
        """
        if closure is None:
            return self._step_without_closure()
        closure = torch.enable_grad()(closure)
        self._begin_step()
        loss, buckets = self._first_pass(closure)
        if not self._decide_once(buckets):
            self._erm_or_skip(buckets, known_norm=True)
            return loss
        perturbed = self._perturb(buckets, 1.0)
        del buckets  # the first pass's gradients are freed before the second pass
        if not perturbed:
            self._skip(None)
            return loss
        self._phase = "perturbed"
        try:
            self._evaluate(closure, "second (at w + ε)")
        except BaseException:
            self._abandon_step()
            raise
        self.restore()
        self._finish_sam_step(check_finite=True)
        return loss

    def _first_pass(self, closure: Closure) -> tuple[Any, list[Bucket]]:
        """The closure at ``w``. Under DDP with per-replica ε it runs under ``no_sync()``, unless the policy can
        decide without the gradient and says ERM (then DDP all-reduces it, as for an SGD step)."""
        if self._sync is not None and not self.policy.needs_grad_norm:
            self._decision = self.policy.decide(math.nan)
        self._first_pass_local = self._sync is not None and self._sync.local_first_pass and self._decision is not False
        with self._sync.first_pass() if self._first_pass_local else contextlib.nullcontext():
            loss = self._evaluate(closure, "first (at w)")
        return loss, self._require_buckets("step")

    def _decide_once(self, buckets: list[Bucket]) -> bool:
        return self._decision if self._decision is not None else self._decide(buckets, 1.0)

    def _step_without_closure(self) -> None:
        if self._phase == "restored":
            self._finish_sam_step(check_finite=not self._via_scaler)
        elif self._phase == "erm":
            self._finish_erm_step()
        elif self._phase == "skipped":
            self._skip(None)
        elif self._phase == "perturbed":
            raise RuntimeError("SAM.step() called while perturbed; run the second pass, then second_step()")
        elif self._decision is False:  # wants_sam_step() answered ERM; the loop calls step() / scaler.step(opt)
            self._erm_or_skip(self._require_buckets("step"))
        elif self._all_gradients_zero():
            self.base_optimizer.step()
        else:
            raise TypeError(
                "SAM.step() needs a closure that computes the loss and calls backward() (it is called at w "
                "and at w + ε); or use first_step()/second_step(), or the perturbed() context manager followed "
                "by step()"
            )

    def _erm_or_skip(self, buckets: list[Bucket], known_norm: bool = False) -> None:
        """The ERM step on the held first gradient; a skipped step when it is not finite (on some replica).

        ``known_norm``: the gradient carries no loss scale (``step(closure)``), so ``||g||``, once computed for the
        policy, is the norm of the gradient the reuse rule sees (unless it is averaged over replicas here)."""
        if self._first_gradient_finite(buckets):
            g_norm = self._grad_norm if known_norm and not self._replica_local() else None
            self._average_local_gradients(buckets)
            self._finish_erm_step(buckets, g_norm)
        else:
            self._skip(None)

    def _all_gradients_zero(self) -> bool:
        buckets = self._buckets()
        # sharded: every rank joins the reduction, also one whose local shards hold no gradient
        return (bool(buckets) or self._shard is not None) and global_norm(
            all_gradients(buckets), math.inf, self._shard
        ) == 0.0

    def _evaluate(self, closure: Closure, which: str) -> Any:
        self.zero_grad(set_to_none=True)
        loss = closure()
        if loss is None:
            raise TypeError(f"SAM.step(): the closure returned None in its {which} call; it must return the loss")
        if not any(p.grad is not None for group in self.param_groups for p in group["params"]):
            raise RuntimeError(
                f"SAM.step(): no parameter received a gradient in the closure's {which} call; the closure "
                "must call loss.backward()"
            )
        return loss

    @_eager
    @torch.no_grad()
    def step_micro_batches(self, closures: Sequence[Closure], weights: Sequence[float] | None = None) -> Tensor:
        r"""One m-SAM step: each micro-batch gets its own perturbation (Foret et al., 2021, §4.1 and App. C.3).

        See :func:`sharpness.optim.m_sharpness.micro_batch_step`. Returns ``Σ_j a_j L_j(w)``, the batch loss at
        ``w``.
        """
        if not isinstance(self.policy, Always) or self.reuse is not None:
            raise ValueError(
                "SAM.step_micro_batches(): m-sharpness steps are always SAM steps; build the SAM without a "
                f"switching policy or reuse rule (got policy {type(self.policy).__name__}, reuse "
                f"{type(self.reuse).__name__ if self.reuse is not None else None})"
            )
        if self._phase == "perturbed":
            raise RuntimeError("SAM.step_micro_batches() called while perturbed; call second_step() or restore()")
        if self._sync is not None:
            raise ValueError(
                "SAM.step_micro_batches(): under DistributedDataParallel every replica already perturbs with its own "
                "batch shard (m = the per-replica batch); use step(closure)"
            )
        self._begin_step()
        return micro_batch_step(self, closures, weights)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """torch's layout (``state``, ``param_groups``: the base optimizer's, SAM's ``sam_`` keys in the groups),
        with SAM's own state in it: LookSAM's ``g_v`` as per-parameter state ``"sam_g_v"``, the step counters and
        the policy's and the reuse's settings and state under the first group's ``"sam"`` key (so that
        ``torch.distributed.checkpoint`` keeps them; see :mod:`sharpness.optim.checkpoint`).

        State-dict pre/post hooks registered on this optimizer run as in torch.
        """
        if self._phase == "perturbed":
            raise RuntimeError(
                "SAM.state_dict() called while the weights are perturbed; the model's weights would be saved "
                "at w + ε. Call second_step() or restore() first"
            )
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = state_dict_of(self)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict` (also the layouts of earlier versions, see :mod:`sharpness.optim.checkpoint`).

        The checkpoint is the one source of every setting it holds: the groups' hyper-parameters (``lr``,
        ``sam_rho``, ...), the policy's settings (``k``, ``delta``, ...; a callable ``Bernoulli`` schedule stays
        the constructor's) and the reuse's ``alpha``. A checkpoint of another policy or reuse type is an error,
        raised before anything is changed.
        """
        if self._phase == "perturbed":
            raise RuntimeError("SAM.load_state_dict() called while perturbed; call restore() first")
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        base_state, sam_state = split_state_dict(state_dict, self.base_optimizer.defaults)
        load_sam_state(self, base_state, sam_state)
        self._end_step()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer.__getstate__ keeps only defaults/state/param_groups; SAM needs its base optimizer too
        # (for copy.deepcopy and pickling). Shared groups and state stay shared through the copy's memo.
        return self.__dict__.copy()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_optimizer={type(self.base_optimizer).__name__}) " + super().__repr__()


_INTERNAL_CODE = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first caller outside torch and this package (for warnings that name its line)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_CODE):
        frame, level = frame.f_back, level + 1
    return level


def _split_for_subset(params: Any, base_optimizer: Any, perturbation: Perturbation, model: nn.Module | None) -> Any:
    """``params`` as groups split by the perturbation's :class:`~sharpness.optim.ascent.ParameterSubset`."""
    if perturbation.subset.perturb == "all":
        return params
    if isinstance(base_optimizer, Optimizer) or params is None:
        raise ValueError(
            "SAM: a ParameterSubset cannot split the groups of an already-built base optimizer; build that optimizer "
            "on sharpness.optim.perturb_subset(model, ...) groups instead"
        )
    items = [params] if isinstance(params, Tensor) else list(params)
    if any(isinstance(item, tuple) for item in items):
        raise ValueError(
            "SAM: a ParameterSubset needs model.parameters() or parameter groups, not named_parameters() "
            "(it selects by the model's names itself)"
        )
    groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    return perturbation.subset.split(model, groups)


def _param_ids(params: Iterable[Any]) -> set[int]:
    """``id`` of every parameter in ``params`` (tensors, ``(name, tensor)`` pairs or group dicts)."""
    items = [params] if isinstance(params, Tensor) else list(params)
    ids: set[int] = set()
    for item in items:
        if isinstance(item, Mapping):
            ids |= _param_ids(item["params"])
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor):
            ids.add(id(item[1]))
        else:
            ids.add(id(item))
    return ids
