"""SAM: Sharpness-Aware Minimization as a wrapper around any ``torch.optim.Optimizer``.

Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving Generalization",
ICLR 2021, arXiv 2010.01412, Algorithm 1; ASAM: Kwon, Kim, Park, Choi, ICML 2021, arXiv 2102.11600.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from sharpness.optim.batchnorm import BatchNormStatsGuard
from sharpness.optim.perturbation import dual_norm, global_norm, unit_ascent
from sharpness.optim.policy import Always, Policy
from sharpness.optim.reuse import LookSAMReuse
from sharpness.optim.snapshot import TensorSnapshot

Closure = Callable[[], Any]
_ADAPTIVE_SCOPES = ("weights", "all")


def _check_group(group: Mapping[str, Any]) -> None:
    """Validate one parameter group's SAM hyper-parameters, naming the bad value and the fix."""
    rho, p, eta = group["rho"], group["p"], group["eta"]
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not math.isfinite(rho) or rho < 0:
        raise ValueError(f"SAM: rho must be a finite number >= 0 (the perturbation radius), got {rho!r}")
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or math.isnan(p) or p < 1:
        raise ValueError(
            f"SAM: p must be a number >= 1 or math.inf (the norm of the perturbation ball), got {p!r}; "
            "p < 1 is not a norm"
        )
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"SAM: eta must be a finite number >= 0 (ASAM's T_w = |w| + eta), got {eta!r}")
    if group["adaptive_scope"] not in _ADAPTIVE_SCOPES:
        raise ValueError(f"SAM: adaptive_scope must be one of {_ADAPTIVE_SCOPES}, got {group['adaptive_scope']!r}")
    for flag in ("adaptive", "include_weight_decay"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"SAM: {flag} must be True or False, got {group[flag]!r}")


@dataclass
class _Bucket:
    """Parameters of one group that share a device, a dtype and whether ASAM rescales them."""

    key: tuple[Any, ...]  # (group index, device, dtype, scaled)
    group: dict[str, Any]
    scaled: bool
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    scale: list[Tensor] | None = None  # ASAM's T_w = |w| + eta for the scaled bucket


class SAM(Optimizer):
    r"""Sharpness-Aware Minimization around a base optimizer (Foret et al., 2021, Algorithm 1).

    Each step solves the inner problem of ``min_w max_{||ε||_p ≤ ρ} L(w + ε)`` to first order,

        ε̂ = ρ · sign(g) |g|^{q-1} / ||g||_q^{q-1}      (1/p + 1/q = 1;  p = 2: ε̂ = ρ g / ||g||_2),

    evaluates the gradient again at ``w + ε̂`` on the same batch, restores ``w`` and lets the base optimizer
    step with that gradient. ``g`` is the gradient of all parameters that have one, across all groups, so the
    norm is global; ``ρ`` may differ per group (each group's ε is its slice of the unit direction times its ρ).

    With ``adaptive=True`` this is ASAM (Kwon et al., 2021): the ball is taken in the coordinates
    ``T_w^{-1} ε`` with ``T_w = |w| + eta`` element-wise, so ``ε̂ = ρ T_w² g / ||T_w g||`` for ``p = 2``.
    ``adaptive_scope="weights"`` (default, the official ASAM code's behaviour) rescales only weight tensors,
    taken here as tensors with ``ndim >= 2``; biases and 1-D normalisation parameters use ``T = 1``. The
    official code selects by the parameter name containing ``"weight"``, which also rescales BatchNorm's
    ``γ``; ``adaptive_scope="all"`` rescales every tensor. davda54/sam's ``adaptive=True`` is
    ``adaptive_scope="all", eta=0``.

    Args:
        params: parameters or parameter-group dicts, as for any optimizer. With an already-built
            ``base_optimizer`` pass ``None`` (or exactly that optimizer's parameters).
        base_optimizer: an optimizer class (or any callable returning an optimizer), built as
            ``base_optimizer(self.param_groups, **base_kwargs)``, or an already-built optimizer instance.
        rho: perturbation radius ρ ≥ 0 (per-group key ``"rho"``).
        adaptive: ASAM's scale-invariant ball (per-group key).
        p: norm of the ball, ``1 <= p <= math.inf`` (default 2). Must be the same in every group.
        eta: ASAM's offset in ``T_w = |w| + eta`` (default 0.01; per-group key).
        adaptive_scope: ``"weights"`` or ``"all"``: which tensors ASAM rescales (per-group key).
        include_weight_decay: build ε from ``g + λ w`` with the group's ``weight_decay`` λ, as the JAX
            implementation does (there weight decay is part of the loss). Default ``False``: ε comes from the
            loss gradient alone, as in the PyTorch implementations; the base optimizer applies its weight decay
            either way.
        model: if given, normalisation layers' running statistics are kept out of the perturbed pass
            automatically (see :func:`sharpness.frozen_bn`).
        policy: whether a step takes the second pass (:mod:`sharpness.optim.policy`; default :class:`Always`,
            plain SAM). Steps the policy declines are ERM steps: one forward/backward and the base step.
        reuse: what an ERM step does with stored SAM information (default ``None``: the plain gradient;
            :class:`~sharpness.optim.reuse.LookSAMReuse`: LookSAM's reuse of ``g_v``).
        **base_kwargs: passed to ``base_optimizer`` when it is a class (``lr``, ``momentum``, ...).

    Three equivalent ways to take a step::

        # 1. closure (torch convention: the closure computes the loss and calls backward; SAM zeroes the
        #    gradients before each call). It is called twice: at w, then at w + ε.
        def closure():
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        loss = opt.step(closure)

        # 2. two steps (davda54/sam's API)
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

        # 3. context manager: the weights are restored on leaving the block, even on an exception
        loss_fn(model(x), y).backward()
        with opt.perturbed():
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

    Restoring copies the saved weights back (bitwise exact); it never subtracts ε. A first gradient that is
    not finite (inf/NaN, e.g. an fp16 overflow) skips the whole step: ``first_step`` returns ``False`` and
    changes nothing (weights, gradients, optimizer state), and ``second_step`` then takes no base step (or
    hands the decision to a ``GradScaler``). ``param_groups`` and ``state`` are the base optimizer's own
    objects, so a learning-rate scheduler works on either object; ``state_dict`` contains the base
    optimizer's full state so a resumed run continues bit-identically. See ``docs/sam.md`` for mixed
    precision, gradient accumulation, clipping and distributed training.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
        base_optimizer: type[Optimizer] | Callable[..., Optimizer] | Optimizer,
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        p: float = 2.0,
        eta: float = 0.01,
        adaptive_scope: Literal["weights", "all"] = "weights",
        include_weight_decay: bool = False,
        model: nn.Module | None = None,
        policy: Policy | None = None,
        reuse: LookSAMReuse | None = None,
        **base_kwargs: Any,
    ) -> None:
        defaults = dict(
            rho=rho,
            p=p,
            adaptive=adaptive,
            eta=eta,
            adaptive_scope=adaptive_scope,
            include_weight_decay=include_weight_decay,
        )
        _check_group(defaults)
        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    f"SAM: keyword arguments {sorted(base_kwargs)} configure a base optimizer class, but an "
                    "already-built optimizer was given; set them on that optimizer instead"
                )
            if params is not None and _param_ids(params) != _param_ids(base_optimizer.param_groups):
                raise ValueError("SAM: params must be the parameters of the given base optimizer instance (or None)")
            base = base_optimizer
            super().__init__(base.param_groups, defaults)
        elif callable(base_optimizer):
            if params is None:
                raise TypeError("SAM: params is required when base_optimizer is a class")
            super().__init__(params, defaults)
            base = base_optimizer(self.param_groups, **base_kwargs)
            if not isinstance(base, Optimizer):
                raise TypeError(f"SAM: base_optimizer must build a torch.optim.Optimizer, got {type(base).__name__}")
        else:
            raise TypeError(
                "SAM: base_optimizer must be an optimizer class such as torch.optim.SGD, or an optimizer "
                f"instance, got {base_optimizer!r}"
            )
        for group in self.param_groups:
            _check_group(group)
        self.base_optimizer = base
        self._adopt_base_groups()
        self._bn_guard = BatchNormStatsGuard(model) if model is not None else None
        self._snapshots: dict[tuple[Any, ...], TensorSnapshot] = {}
        self._phase: Literal["idle", "perturbed", "restored", "skipped"] = "idle"
        self.last_grad_norm: float = math.nan
        """Dual norm ``||g||_q`` (of ``T_w g`` for ASAM) of the gradient seen by the last :meth:`first_step`,
        loss scale removed; inf/NaN if that gradient was not finite."""
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"SAM: policy must be a sharpness.optim.policy.Policy, got {type(policy).__name__}")
        if reuse is not None and not isinstance(reuse, LookSAMReuse):
            raise TypeError(f"SAM: reuse must be None or a LookSAMReuse, got {type(reuse).__name__}")
        self.policy = policy if policy is not None else Always()
        self.reuse = reuse
        self._decision: bool | None = None  # the policy's answer for the current step, once asked
        self._sq_grad_norm: float | None = None  # ||g||² of the current step, if the policy needed it
        self.steps = 0  # optimizer steps taken (SAM and ERM)
        self.sam_steps = 0  # of which SAM (two-pass) steps

    def _adopt_base_groups(self) -> None:
        # One set of group dicts for both objects: a scheduler or a user editing either one edits both.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to SAM and the base optimizer alike (SAM's defaults fill missing SAM keys)."""
        if "base_optimizer" not in self.__dict__:  # called by Optimizer.__init__ before the base exists
            super().add_param_group(param_group)
            return
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        _check_group(param_group)
        self.base_optimizer.add_param_group(param_group)

    @property
    def is_perturbed(self) -> bool:
        """True between :meth:`first_step` and :meth:`restore` / :meth:`second_step`."""
        return self._phase == "perturbed"

    # ------------------------------------------------------------------ the two passes

    def _collect_buckets(self) -> list[_Bucket]:
        buckets: dict[tuple[Any, ...], _Bucket] = {}
        for index, group in enumerate(self.param_groups):
            _check_group(group)
            scale_all = group["adaptive"] and group["adaptive_scope"] == "all"
            scale_weights = group["adaptive"]
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise ValueError(
                        f"SAM does not support sparse gradients (parameter of shape {tuple(param.shape)}); "
                        "use dense gradients, e.g. nn.Embedding(..., sparse=False)"
                    )
                scaled = scale_all or (scale_weights and param.ndim >= 2)
                key = (index, param.device, param.dtype, scaled)
                bucket = buckets.get(key)
                if bucket is None:
                    bucket = buckets[key] = _Bucket(key, group, scaled)
                bucket.params.append(param)
                bucket.grads.append(grad)
        devices = {key[1] for key in buckets}
        if len(devices) > 1:
            raise ValueError(
                f"SAM: parameters are on several devices ({', '.join(sorted(map(str, devices)))}); the "
                "perturbation needs one global gradient norm. Put all parameters on one device, or use one "
                "SAM optimizer per device"
            )
        return list(buckets.values())

    def _ascent_input(self, bucket: _Bucket, loss_scale: float) -> list[Tensor]:
        """``h`` whose dual-norm ball is maximised: ``T_w (g + λ w)``, each part only where configured."""
        group, h = bucket.group, bucket.grads
        weight_decay = group.get("weight_decay", 0.0) if group["include_weight_decay"] else 0.0
        if weight_decay:
            h = torch._foreach_add(h, bucket.params, alpha=weight_decay * loss_scale)
        if bucket.scaled:
            bucket.scale = torch._foreach_abs(bucket.params)
            torch._foreach_add_(bucket.scale, group["eta"])
            h = torch._foreach_mul(h, bucket.scale)
        return h

    def _norm_p(self) -> float:
        ps = {float(group["p"]) for group in self.param_groups}
        if len(ps) > 1:
            raise ValueError(f"SAM: all parameter groups must use the same p, got {sorted(ps)}")
        return ps.pop()

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, scaler: torch.amp.GradScaler | None = None) -> bool:
        """Move the weights to ``w + ε̂`` computed from the gradients they hold now.

        Returns ``True`` when perturbed. Returns ``False``, changing nothing at all (weights, gradients, even
        with ``zero_grad=True``), when the gradient is not finite: the caller should skip the second pass;
        :meth:`second_step` will then skip the base step. Pass the ``scaler`` when gradients carry a
        ``GradScaler`` loss scale and ``include_weight_decay=True`` (so the ``λ w`` term is scaled alike).
        A zero gradient gives ``ε̂ = 0``: the weights stay where they are.
        """
        if self._phase == "perturbed":
            raise RuntimeError(
                "SAM.first_step() called while the weights are already perturbed; call second_step() or restore() first"
            )
        buckets = self._require_buckets("first_step")
        if self._decision is None:
            self._decide(buckets)
        p = self._norm_p()
        loss_scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        hs = [self._ascent_input(bucket, loss_scale) for bucket in buckets]
        norm = dual_norm(hs, p)
        self.last_grad_norm = norm / loss_scale
        if not math.isfinite(norm):
            self._phase = "skipped"
            return False
        if self.reuse is not None:
            self.reuse.save_first_gradient([b.params for b in buckets], [b.grads for b in buckets])
        if norm > 0.0:
            directions, coefficient = unit_ascent(hs, p, norm)
            snapshots = [self._snapshot_for(bucket) for bucket in buckets]
            try:
                for bucket, direction in zip(buckets, directions, strict=True):
                    if bucket.scale is not None:
                        direction = torch._foreach_mul(direction, bucket.scale)
                    torch._foreach_add_(bucket.params, direction, alpha=bucket.group["rho"] * coefficient)
            except BaseException:
                for snapshot in snapshots:
                    snapshot.restore()
                raise
        if self._bn_guard is not None:
            self._bn_guard.save()
        self._phase = "perturbed"
        if zero_grad:
            self.zero_grad()
        return True

    def _snapshot_for(self, bucket: _Bucket) -> TensorSnapshot:
        snapshot = self._snapshots.get(bucket.key)
        if snapshot is None:
            snapshot = self._snapshots[bucket.key] = TensorSnapshot()
        snapshot.save(bucket.params)
        return snapshot

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

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, scaler: torch.amp.GradScaler | None = None) -> None:
        """Restore ``w`` and take the base optimizer's step with the gradient computed at ``w + ε̂``.

        With a ``scaler`` the base step goes through ``scaler.step(self.base_optimizer)``, which unscales the
        gradients and skips the step when they hold inf/NaN; call ``scaler.update()`` afterwards as usual.
        After a skipped :meth:`first_step` no base step is taken (with a scaler, one gradient entry is set to
        NaN so that the scaler skips too and lowers its scale).
        """
        if self._phase == "idle":
            raise RuntimeError("SAM.second_step() called without first_step(); call first_step() first")
        self.restore()
        skipped = self._phase == "skipped"
        self._phase = "idle"
        if not skipped:
            self.sam_steps += 1
            if self.reuse is not None:
                buckets = self._collect_buckets()
                self.reuse.update([b.params for b in buckets], [b.grads for b in buckets])
        self._take_base_step(skipped, scaler, zero_grad)

    def _take_base_step(self, skipped: bool, scaler: torch.amp.GradScaler | None, zero_grad: bool) -> None:
        if scaler is not None:
            if skipped:
                self._poison_one_gradient()
            scaler.step(self.base_optimizer)
        elif not skipped:
            self.base_optimizer.step()
        # Tell a torch LR scheduler wrapping self.step that an optimizer step happened (it checks this flag).
        self._opt_called = True
        self.steps += not skipped
        self._decision = self._sq_grad_norm = None
        if zero_grad:
            self.zero_grad()

    # ------------------------------------------------------------------ policies: SAM or ERM step

    def _require_buckets(self, caller: str) -> list[_Bucket]:
        buckets = self._collect_buckets()
        if not buckets:
            raise RuntimeError(
                f"SAM.{caller}(): no parameter has a gradient. Call loss.backward() first; "
                "check that the loss depends on the optimised parameters"
            )
        return buckets

    def _decide(self, buckets: list[_Bucket]) -> bool:
        """Ask the policy once for this step; a non-finite gradient never reaches it (the step is skipped)."""
        if self.policy.needs_grad_norm:
            self._sq_grad_norm = global_norm([b.grads for b in buckets], 2.0) ** 2
            if not math.isfinite(self._sq_grad_norm):  # first_step / erm_step will skip this step
                self._decision = False
                return False
        self._decision = self.policy.decide(math.nan if self._sq_grad_norm is None else self._sq_grad_norm)
        return self._decision

    @torch.no_grad()
    def wants_sam_step(self) -> bool:
        """Whether this step should take the second pass, per the policy; call after the first backward.

        The answer is computed once per step (the policy's state advances then) and repeated until the step is
        taken by :meth:`second_step` or :meth:`erm_step`. Two-step usage with a policy::

            loss_fn(model(x), y).backward()
            if opt.wants_sam_step():
                opt.first_step(zero_grad=True)
                loss_fn(model(x), y).backward()
                opt.second_step(zero_grad=True)
            else:
                opt.erm_step(zero_grad=True)
        """
        if self._decision is None:
            self._decide(self._require_buckets("wants_sam_step"))
        return bool(self._decision)

    @torch.no_grad()
    def erm_step(self, zero_grad: bool = False, *, scaler: torch.amp.GradScaler | None = None) -> None:
        """An ERM step: the base optimizer's step on the current gradient (with the ``reuse`` rule applied).

        The weights are not perturbed and no second pass is needed. A gradient that is not finite skips the
        step, as in :meth:`first_step` (with a ``scaler``, the scaler decides and backs off its scale).
        """
        if self._phase == "perturbed":
            raise RuntimeError("SAM.erm_step() called while perturbed; finish the SAM step with second_step()")
        buckets = self._require_buckets("erm_step")
        if self._decision is None:
            self._decide(buckets)
        grads = [b.grads for b in buckets]
        sq_norm = self._sq_grad_norm if self._sq_grad_norm is not None else global_norm(grads, 2.0) ** 2
        finite = math.isfinite(sq_norm)
        if finite and self.reuse is not None:
            self.reuse.apply([b.params for b in buckets], grads)
        self._phase = "idle"
        self._take_base_step(not finite, scaler, zero_grad)

    def set_total_steps(self, total_steps: int) -> None:
        """Tell the policy the planned number of steps (for schedules of progress), unless it was given one."""
        if self.policy.total_steps is None:
            self.policy.set_total_steps(total_steps)

    def statistics(self) -> dict[str, float]:
        """Steps, SAM steps, SAM fraction and the policy's last figures (``s``, ``mu``, ``sigma``, ``c`` or ``p``)."""
        fraction = self.sam_steps / self.steps if self.steps else math.nan
        return {"steps": self.steps, "sam_steps": self.sam_steps, "sam_fraction": fraction, **self.policy.statistics()}

    def _poison_one_gradient(self) -> None:
        """Make sure a ``GradScaler`` skips a step SAM skipped, and backs off its scale.

        SAM skips when ``||g||_q`` is not finite in the gradients' precision. Usually that means inf/NaN
        entries, which the scaler sees too; but a huge loss scale can overflow the norm of finite gradients,
        and the scaler would then step. A NaN in one gradient makes both agree.
        """
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad[(0,) * param.grad.ndim] = math.nan
                    return

    @contextmanager
    def perturbed(self, zero_grad: bool = True, *, scaler: torch.amp.GradScaler | None = None) -> Iterator[bool]:
        """``first_step`` on entry and :meth:`restore` on exit, even if the body raises.

        Yields whether the weights were perturbed (``False``: non-finite gradient, skip the second pass).
        Call :meth:`second_step` after the block to take the base step.
        """
        applied = self.first_step(zero_grad=zero_grad, scaler=scaler)
        try:
            yield applied
        except BaseException:
            self._abandon_step()
            raise
        self.restore()

    def _abandon_step(self) -> None:
        """After an exception in the perturbed pass: weights restored, no base step, next step decided afresh."""
        self.restore()
        self._phase = "idle"
        self._decision = self._sq_grad_norm = None

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:  # type: ignore[override]
        """One SAM step with a closure that computes the loss and calls ``backward()``; returns the loss at w.

        The gradients are zeroed before each of the two closure calls. On an exception in the second call
        the weights are restored before it propagates, and no base step is taken.
        """
        if closure is None:
            raise TypeError(
                "SAM.step() needs a closure that computes the loss and calls backward() (it is called at w "
                "and at w + ε); or use first_step()/second_step()"
            )
        closure = torch.enable_grad()(closure)
        loss = self._evaluate(closure, "first (at w)")
        if not self.wants_sam_step():
            self.erm_step()
            return loss
        if self.first_step():
            try:
                self._evaluate(closure, "second (at w + ε)")
            except BaseException:
                self._abandon_step()
                raise
            self.restore()
        self.second_step()
        return loss

    @torch.no_grad()
    def step_micro_batches(self, closures: Sequence[Closure], weights: Sequence[float] | None = None) -> Tensor:
        r"""One m-SAM step: each micro-batch gets its own perturbation (Foret et al., 2021, §4.1 and App. C.3).

        The batch is split into disjoint micro-batches of ``m`` examples, one closure each (it computes the mean
        loss of its micro-batch and calls ``backward``, as for :meth:`step`). For every micro-batch ``j``,
        ``ε̂_j`` is built from its own gradient ``g_j`` at ``w`` and the gradient is taken again at ``w + ε̂_j``;
        the base optimizer then steps with the weighted mean

            g^{SAM} = Σ_j a_j ∇L_j(w + ε̂_j),      a_j = weights_j / Σ_k weights_k   (default: equal),

        which is what data-parallel SAM computes when every accelerator perturbs with its own sub-batch of size
        ``m``. Pass the micro-batch sizes as ``weights`` when they differ, so that the step is the gradient of the
        mean loss over the whole batch. ``m`` = the batch size (one closure) is plain SAM; smaller ``m`` is what
        the paper found to generalise better. Each micro-batch costs two forward/backward passes, so a step costs
        two passes over the batch, as plain SAM does, but in smaller pieces. Normalisation statistics are
        updated by every micro-batch's first pass (never by a perturbed pass, when SAM has the ``model``).

        Every step is a SAM step: a switching ``policy`` or a ``reuse`` rule is an error. A micro-batch gradient
        that is not finite skips the whole step (no base step). Returns ``Σ_j a_j L_j(w)``, the batch loss at
        ``w``.
        """
        closures = list(closures)
        if not closures:
            raise ValueError("SAM.step_micro_batches(): closures is empty; give one closure per micro-batch")
        if not isinstance(self.policy, Always) or self.reuse is not None:
            raise ValueError(
                "SAM.step_micro_batches(): m-sharpness steps are always SAM steps; build the SAM without a "
                f"switching policy or reuse rule (got policy {type(self.policy).__name__}, reuse "
                f"{type(self.reuse).__name__ if self.reuse is not None else None})"
            )
        if self._phase == "perturbed":
            raise RuntimeError("SAM.step_micro_batches() called while perturbed; call second_step() or restore()")
        shares = _micro_batch_shares(weights, len(closures))
        sums: dict[int, tuple[Tensor, Tensor]] = {}  # id(param) -> (param, Σ_j a_j ∇L_j(w + ε̂_j))
        loss = None
        for index, (closure, share) in enumerate(zip(closures, shares, strict=True)):
            closure = torch.enable_grad()(closure)
            micro_loss = self._evaluate(closure, f"first (micro-batch {index}, at w)")
            if not self.first_step():
                self.second_step()  # skipped: no base step
                return micro_loss
            try:
                self._evaluate(closure, f"second (micro-batch {index}, at w + ε)")
            except BaseException:
                self._abandon_step()
                raise
            self.restore()
            weighted = torch.as_tensor(micro_loss).detach() * share
            loss = weighted if loss is None else loss + weighted
            for group in self.param_groups:
                for param in group["params"]:
                    if param.grad is None:
                        continue
                    entry = sums.get(id(param))
                    if entry is None:
                        sums[id(param)] = (param, param.grad.mul(share))
                    else:
                        entry[1].add_(param.grad, alpha=share)
        self.zero_grad(set_to_none=True)
        for param, total in sums.values():
            param.grad = total
        self.second_step()
        return loss

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

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's full state (buffers, moments, step counts, groups with SAM's keys), and SAM's own:
        step counters, the policy's state (moving averages, random generator) and the reuse's ``g_v``."""
        if self._phase == "perturbed":
            raise RuntimeError(
                "SAM.state_dict() called while the weights are perturbed; the model's weights would be saved "
                "at w + ε. Call second_step() or restore() first"
            )
        sam_state = {
            "format": 1,
            "steps": self.steps,
            "sam_steps": self.sam_steps,
            "policy": self.policy.state_dict(),
            "reuse": self.reuse.state_dict(self._param_order()) if self.reuse is not None else None,
        }
        return {"base_optimizer": self.base_optimizer.state_dict(), "sam": sam_state}

    def _param_order(self) -> list[Tensor]:
        return [param for group in self.param_groups for param in group["params"]]

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` (the base optimizer's state and every group's SAM keys)."""
        if not isinstance(state_dict, Mapping) or "base_optimizer" not in state_dict or "sam" not in state_dict:
            found = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
            raise ValueError(
                "SAM.load_state_dict(): not a sharpness.SAM state dict (expected keys 'base_optimizer' and "
                f"'sam', found {found}); to load a plain optimizer's state use "
                "opt.base_optimizer.load_state_dict(...)"
            )
        if self._phase == "perturbed":
            raise RuntimeError("SAM.load_state_dict() called while perturbed; call restore() first")
        sam_state = state_dict["sam"]
        if (sam_state.get("reuse") is None) != (self.reuse is None):
            raise ValueError("SAM.load_state_dict(): the state and this optimizer disagree on whether reuse is used")
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self._adopt_base_groups()
        self.steps, self.sam_steps = sam_state.get("steps", 0), sam_state.get("sam_steps", 0)
        if "policy" in sam_state:
            self.policy.load_state_dict(sam_state["policy"])
        if self.reuse is not None:
            self.reuse.load_state_dict(sam_state["reuse"], self._param_order())
        self._decision = self._sq_grad_norm = None
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            _check_group(group)
        self._phase = "idle"

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer.__getstate__ keeps only defaults/state/param_groups; SAM needs its base optimizer too
        # (for copy.deepcopy and pickling). Shared groups and state stay shared through the copy's memo.
        return self.__dict__.copy()

    def __repr__(self) -> str:
        return f"SAM(base_optimizer={type(self.base_optimizer).__name__}) " + super().__repr__()


def _micro_batch_shares(weights: Sequence[float] | None, count: int) -> list[float]:
    """``weights`` normalised to sum 1 (equal shares when ``None``), checked against the number of closures."""
    if weights is None:
        return [1.0 / count] * count
    weights = list(weights)
    if len(weights) != count:
        raise ValueError(f"SAM.step_micro_batches(): {len(weights)} weights for {count} closures; give one each")
    if not all(isinstance(w, numbers.Real) and math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"SAM.step_micro_batches(): weights must be finite numbers >= 0 with a positive sum (e.g. the "
            f"micro-batch sizes), got {weights}"
        )
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def _param_ids(params: Iterable[Any]) -> set[int]:
    items = [params] if isinstance(params, Tensor) else list(params)
    ids: set[int] = set()
    for item in items:
        if isinstance(item, Mapping):
            group_params = item["params"]
            ids.update(map(id, [group_params] if isinstance(group_params, Tensor) else group_params))
        else:
            ids.add(id(item))
    return ids
