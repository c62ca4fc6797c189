"""Reuse: what an ERM (one-pass) step of a SAM-family optimizer does with information from past SAM steps.

Without reuse an ERM step is the base optimizer's step on the plain gradient ``g``. :class:`LookSAMReuse` is
LookSAM's (Liu, Mai, Chen, Hsieh, You, CVPR 2022, Alg. 1): on each SAM step it stores the component of the SAM
gradient ``g_s`` orthogonal to the gradient ``g`` of the same step,

    g_v = g_s - (<g_s, g> / ||g||²) g,

and on ERM steps it replaces ``g`` by

    g + α (||g|| / ||g_v||) g_v,

i.e. it adds the stored "sharpness direction" with a length of ``α ||g||``. With ``per_tensor=True`` both
formulas are applied to each parameter tensor separately (the projection and the length per tensor, the
layer-wise variant); by default the inner product and the norms are global. Before the first SAM step there is no
``g_v`` and an ERM step uses ``g`` alone. The direction of ``g_v`` and the ratio are invariant to a common scale
of the gradients, so a ``GradScaler``'s loss scale does not change the update.

Numerics: the projection is computed in float32 or wider (half-precision gradients are upcast), as
``<g_s, g>/||g||² = (||g_s||/||g||) cos θ`` with ``cos θ`` from the unit vectors (no squared norms that could
overflow, no cancellation between large squares), and ``g_v`` is stored in the parameters' dtype. A ``g_v`` that
is not finite is never stored (the previous one is kept), and a stored ``g_v`` of norm 0 adds nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sharpness.checks import check_bool, check_real
from sharpness.optim.perturbation import Buckets, accumulation_dtype, global_norm, tensor_norms
from sharpness.optim.sharding import ShardReduce, local_shard


class LookSAMReuse:
    """LookSAM's gradient reuse with weight ``alpha`` (see the module docstring)."""

    def __init__(self, alpha: float = 0.7, per_tensor: bool = False) -> None:
        self.alpha = check_real(alpha, "alpha", owner="LookSAMReuse", low=0.0, what="LookSAM's reuse weight")
        self.per_tensor = check_bool(per_tensor, "per_tensor", owner="LookSAMReuse")
        self.g_v: dict[Tensor, Tensor] = {}  # parameter -> stored orthogonal component
        self._first: dict[Tensor, Tensor] = {}  # parameter -> gradient at w of the current SAM step
        self._first_norm: float | None = None  # ||g|| of the saved g, when the caller knew it
        self._v_norm: float | None = None  # ||g_v||, once measured (kept until g_v changes)

    def save_first_gradient(self, params: Buckets, grads: Buckets, norm: float | None = None) -> None:
        """Keep ``g`` of a SAM step (the first pass's gradient is zeroed before the second pass); ``norm``: its
        2-norm if the caller measured it already (over every rank's shards, for sharded parameters)."""
        self._first = {p: g.detach().clone() for p, g in _pairs(params, grads)}
        self._first_norm = norm

    def discard_first_gradient(self) -> None:
        """Forget the saved ``g`` of a SAM step that was skipped or abandoned."""
        self._first, self._first_norm = {}, None

    @torch.no_grad()
    def update(self, params: Buckets, sam_grads: Buckets, reduce: ShardReduce | None = None) -> None:
        """After a SAM step's second pass: ``g_v = g_s - (<g_s, g>/||g||²) g`` from the saved ``g``.

        Call only with finite gradients; a ``g_v`` that still comes out non-finite is not stored. With ``reduce``
        the buckets are this rank's shards of sharded parameters, and inner products and norms span the ranks.
        """
        keys, g_s, g = _matched(params, sam_grads, self._first)
        g_norm = self._first_norm if sum(map(len, g)) == len(self._first) else None  # a norm over all of g
        self.discard_first_gradient()
        _check_sharding(self.per_tensor, reduce)
        if not keys and reduce is None:
            return
        dtypes = [bucket[0].dtype for bucket in g_s]  # stored in the gradients' dtype
        g_s, g = _upcast(g_s), _upcast(g)
        if self.per_tensor:
            pairs = zip(g_s, g, strict=True)
            g_v = [torch._foreach_sub(s, torch._foreach_mul(f, _tensor_coefficients(s, f))) for s, f in pairs]
        else:
            coefficient = _projection_coefficient(g_s, g, reduce, g_norm)
            g_v = [torch._foreach_add(s, f, alpha=-coefficient) for s, f in zip(g_s, g, strict=True)]
        v_norm = global_norm(g_v, 2.0, reduce)
        if not math.isfinite(v_norm):
            return
        self._v_norm = v_norm if dtypes == [bucket[0].dtype for bucket in g_v] else None  # else stored rounded
        self.g_v = {
            key: v.to(dtype)
            for bucket_keys, v_list, dtype in zip(keys, g_v, dtypes, strict=True)
            for key, v in zip(bucket_keys, v_list, strict=True)
        }

    def average_over_replicas(self, average: Callable[[list[Tensor]], None]) -> None:
        """Average the stored ``g_v`` in place over data-parallel replicas with ``average`` (a collective)."""
        average(list(self.g_v.values()))
        self._v_norm = None

    @torch.no_grad()
    def apply(
        self, params: Buckets, grads: Buckets, reduce: ShardReduce | None = None, g_norm: float | None = None
    ) -> None:
        """On an ERM step, in place: ``g += α (||g|| / ||g_v||) g_v`` (a no-op before the first SAM step);
        ``g_norm``: ``||g||`` over all of ``grads`` if the caller measured it already."""
        _check_sharding(self.per_tensor, reduce)
        stored = bool(self.g_v) if reduce is None else not reduce.all_true(not self.g_v)  # any rank holds g_v
        if not stored or self.alpha == 0.0:
            return
        _, g, g_v = _matched(params, grads, self.g_v)
        if not g and reduce is None:
            return
        if sum(map(len, g)) != sum(map(len, grads)):
            g_norm = None  # some gradient has no stored g_v: ||g|| is over the others
        if self.per_tensor:
            for g_list, v_list in zip(g, g_v, strict=True):
                ratios = _safe_ratios(tensor_norms([g_list], 2.0), tensor_norms([v_list], 2.0))
                torch._foreach_add_(g_list, torch._foreach_mul(v_list, [self.alpha * r for r in ratios]))
            return
        v_norm = self._stored_norm(g_v, reduce)
        if not (math.isfinite(v_norm) and v_norm > 0.0):
            return
        scale = self.alpha * (g_norm if g_norm is not None else global_norm(g, 2.0, reduce)) / v_norm
        for g_list, v_list in zip(g, g_v, strict=True):
            torch._foreach_add_(g_list, v_list, alpha=scale)

    def _stored_norm(self, g_v: list[list[Tensor]], reduce: ShardReduce | None) -> float:
        """``||g_v||``, the same on every ERM step until the next SAM step: measured once (when stored, or at the first
        ERM step after an average over replicas). Not cached when some stored tensor's parameter has no gradient
        this step (the norm is then over the others) or for shards (every rank must join the reduction)."""
        if reduce is not None or sum(map(len, g_v)) != len(self.g_v):
            return global_norm(g_v, 2.0, reduce)
        if self._v_norm is None:
            self._v_norm = global_norm(g_v, 2.0, reduce)
        return self._v_norm

    def state_dict(self, param_order: list[Tensor]) -> dict[str, Any]:
        """``g_v`` by the parameters' positions in ``param_order`` (as optimizer state dicts do), and the settings."""
        index = {p: i for i, p in enumerate(param_order)}
        return {"alpha": self.alpha, "per_tensor": self.per_tensor, "g_v": {index[p]: v for p, v in self.g_v.items()}}

    def load_state_dict(self, state: dict[str, Any], param_order: list[Tensor]) -> None:
        """Restore :meth:`state_dict` (``alpha`` and ``per_tensor`` included: the checkpoint is the source)."""
        missing = sorted({"alpha", "per_tensor", "g_v"} - set(state))
        if missing:
            raise ValueError(f"LookSAMReuse: the saved state lacks {missing}; it is not a LookSAM reuse state")
        bad = [i for i in state["g_v"] if not 0 <= int(i) < len(param_order)]
        if bad:
            raise ValueError(f"LookSAMReuse: the saved g_v names parameters {bad} this optimizer does not have")
        self.alpha, self.per_tensor = state["alpha"], state["per_tensor"]
        self._v_norm = None
        self.g_v = {
            param_order[int(i)]: v.to(device=local_shard(param_order[int(i)]).device) for i, v in state["g_v"].items()
        }

    def __repr__(self) -> str:
        return f"LookSAMReuse(alpha={self.alpha}, per_tensor={self.per_tensor})"


def _pairs(params: Buckets, grads: Buckets) -> list[tuple[Tensor, Tensor]]:
    return [pair for ps, gs in zip(params, grads, strict=True) for pair in zip(ps, gs, strict=True)]


def _matched(
    params: Buckets, grads: Buckets, stored: dict[Tensor, Tensor]
) -> tuple[list[list[Tensor]], list[list[Tensor]], list[list[Tensor]]]:
    """Per bucket, the parameters that have a ``stored`` tensor, their gradients and the stored tensors."""
    keys, matched_grads, matched_stored = [], [], []
    for ps, gs in zip(params, grads, strict=True):
        bucket = [(p, g) for p, g in zip(ps, gs, strict=True) if p in stored]
        if bucket:
            keys.append([p for p, _ in bucket])
            matched_grads.append([g for _, g in bucket])
            matched_stored.append([stored[p] for p, _ in bucket])
    return keys, matched_grads, matched_stored


def _upcast(buckets: Buckets) -> list[list[Tensor]]:
    """Each bucket in its accumulation dtype (float32 for half precision; no copy otherwise)."""
    return [[t.to(accumulation_dtype(t.dtype)) for t in ts] if ts[0].dtype in _HALF else list(ts) for ts in buckets]


_HALF = (torch.float16, torch.bfloat16)


def _projection_coefficient(
    a: Buckets, b: Buckets, reduce: ShardReduce | None = None, b_norm: float | None = None
) -> float:
    """``<a, b> / ||b||²`` over all buckets as ``(||a||/||b||) cos θ``, ``cos θ = 1 - ||a/||a|| - b/||b||||² / 2``
    (0 when either vector is 0); ``b_norm``: ``||b||`` if known."""
    a_norm = global_norm(a, 2.0, reduce)
    b_norm = b_norm if b_norm is not None else global_norm(b, 2.0, reduce)
    if a_norm == 0.0 or b_norm == 0.0:
        return 0.0
    difference = [torch._foreach_div(ts, a_norm) for ts in a]
    for d, ts in zip(difference, b, strict=True):
        torch._foreach_sub_(d, torch._foreach_div(ts, b_norm))
    cosine = 1.0 - global_norm(difference, 2.0, reduce) ** 2 / 2.0
    return (a_norm / b_norm) * cosine


def _check_sharding(per_tensor: bool, reduce: ShardReduce | None) -> None:
    if per_tensor and reduce is not None:
        raise ValueError("LookSAMReuse(per_tensor=True) is not supported with sharded (FSDP2) parameters")


def _tensor_coefficients(a: list[Tensor], b: list[Tensor]) -> list[float]:
    """``<a_i, b_i> / ||b_i||²`` per pair of tensors, as in :func:`_projection_coefficient` (0 where either is 0)."""
    a_norms, b_norms = tensor_norms([a], 2.0), tensor_norms([b], 2.0)
    ok = (a_norms > 0) & (b_norms > 0) & torch.isfinite(a_norms) & torch.isfinite(b_norms)
    a_safe, b_safe = torch.where(ok, a_norms, 1.0), torch.where(ok, b_norms, 1.0)
    a_unit, b_unit = torch._foreach_div(a, a_safe.tolist()), torch._foreach_div(b, b_safe.tolist())
    plus = tensor_norms([torch._foreach_add(a_unit, b_unit)], 2.0)
    minus = tensor_norms([torch._foreach_sub(a_unit, b_unit)], 2.0)
    cosine = (plus**2 - minus**2) / 4.0
    return torch.where(ok, a_safe / b_safe * cosine, 0.0).tolist()


def _safe_ratios(numerators: Tensor, denominators: Tensor) -> list[float]:
    """``n_i / d_i``, with 0 where ``d_i`` is 0 or not finite (a zero ``g_v`` tensor adds nothing)."""
    ok = torch.isfinite(denominators) & (denominators > 0)
    return torch.where(ok, numerators / torch.where(ok, denominators, 1.0), 0.0).tolist()
