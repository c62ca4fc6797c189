"""First-order solution of SAM's inner maximisation for a general p-norm ball, and the norms it needs.

SAM (Foret et al., ICLR 2021, arXiv 2010.01412, eq. 2) replaces
``max_{||ε||_p ≤ ρ} L(w + ε)`` by its first-order Taylor model ``max_{||ε||_p ≤ ρ} <h, ε>``, where ``h`` is the
gradient (or, for ASAM, the gradient in the rescaled coordinates ``T_w g``). The maximiser is given by the
dual norm, ``1/p + 1/q = 1``:

    ε̂ = ρ · sign(h) |h|^{q-1} / ||h||_q^{q-1},          max = ρ ||h||_q,

with the limits ``p = 2 → ε̂ = ρ h / ||h||_2``, ``p = ∞ → ε̂ = ρ sign(h)`` and ``p = 1 → ε̂ = ρ sign(h_j) e_j`` at
``j = argmax |h_j|`` (ties share ρ equally). Everything is homogeneous of degree 0 in ``h``, so a gradient that
carries a loss scale (fp16 ``GradScaler``) gives the same ε̂.

Numerics. Norms are accumulated in float32 or wider (half-precision gradients included) and combined across
tensors in float64. A 2-norm computed as ``√Σh²`` overflows (``||h|| ≳ 1.8e19`` in float32) or underflows
(``≲ 1e-19``) long before ``h`` itself does, so a tensor whose norm lands outside the safe range is re-measured
as ``max|h| · ||h / max|h|||`` (the scaling the other ``p`` use throughout). The unit direction is formed the same
way when ``||h||`` is tiny, so ``ρ/||h||`` never overflows. An inf/NaN entry gives an inf/NaN norm.

The functions work on *buckets*: a list of tensor lists, each list on one device and of one dtype, so every
operation is a ``torch._foreach_*`` call per bucket and never a Python loop over parameters on the common path.
Zero-size tensors must not be passed (the caller drops them: they hold no direction).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from sharpness.optim.sharding import ShardReduce

Buckets = Sequence[list[Tensor]]


def dual_exponent(p: float) -> float:
    """Return ``q`` with ``1/p + 1/q = 1`` (``q = ∞`` for ``p = 1`` and ``q = 1`` for ``p = ∞``)."""
    if p == 1:
        return math.inf
    if math.isinf(p):
        return 1.0
    return p / (p - 1.0)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms and dot products of ``dtype`` tensors are accumulated in: float32 or wider."""
    if dtype in (torch.float64, torch.complex128):
        return torch.float64
    return torch.float32


def _safe_range(dtype: torch.dtype) -> tuple[float, float]:
    """Per-tensor 2-norms inside this range cannot have over- or underflowed while summing squares."""
    info = torch.finfo(dtype)
    return math.sqrt(info.tiny) * 2.0**12, math.sqrt(info.max) * 2.0**-12


def tensor_norms(buckets: Buckets, ord: float) -> Tensor:
    """The ``ord``-norm of every tensor of ``buckets``, in order, as a float64 CPU vector, without over/underflow
    (:func:`tensor_norm_values` as a tensor)."""
    return torch.tensor(tensor_norm_values(buckets, ord), dtype=torch.float64)


def tensor_norm_values(buckets: Buckets, ord: float) -> list[float]:
    """The ``ord``-norm of every tensor of ``buckets``, in order, as Python floats, without over/underflow.

    Inf/NaN entries give inf/NaN. The common case is one ``torch._foreach_norm`` per bucket, accumulated in
    float32 or wider, and one host transfer for all of them; the range checks run on the host (a few floats: cheaper
    than launching tensor operations for them).
    """
    buckets = [tensors for tensors in buckets if tensors]
    if not buckets:
        return []
    raw = [torch.stack(torch._foreach_norm(ts, ord, dtype=accumulation_dtype(ts[0].dtype))) for ts in buckets]
    norms: list[float] = (raw[0] if len(raw) == 1 else torch.cat([n.double() for n in raw])).tolist()
    if ord in (1.0, math.inf):  # sums of |h| or a max: no squares to overflow
        return norms
    start = 0
    for tensors in buckets:
        low, high = _safe_range(accumulation_dtype(tensors[0].dtype))
        suspect = [i for i in range(len(tensors)) if not low <= norms[start + i] <= high]  # 0 may be an underflow
        if suspect:  # rare: measure these again as max|h| · ||h / max|h|||
            for i, value in zip(suspect, _scaled_norms([tensors[i] for i in suspect], ord).tolist(), strict=True):
                norms[start + i] = value
        start += len(tensors)
    return norms


def _scaled_norms(tensors: list[Tensor], ord: float) -> Tensor:
    """``max|h| · ||h / max|h|||_ord`` per tensor (float64, CPU): no square can over- or underflow.

    A tensor whose largest entry is 0 (most suspects in practice: exactly zero gradients) or not finite keeps
    ``max|h|`` (0, inf or NaN) without being rescaled.
    """
    acc = accumulation_dtype(tensors[0].dtype)
    peaks = torch.stack(torch._foreach_norm(tensors, math.inf, dtype=acc)).double().cpu()
    rescale = (torch.isfinite(peaks) & (peaks > 0)).nonzero().flatten().tolist()
    if rescale:
        chosen = [tensors[i] if tensors[i].dtype == acc else tensors[i].to(acc) for i in rescale]
        scaled = torch._foreach_div(chosen, peaks[rescale].tolist())
        peaks[rescale] = peaks[rescale] * torch.stack(torch._foreach_norm(scaled, ord)).double().cpu()
    return peaks


def combine_norms(norms: Sequence[float], ord: float) -> float:
    """``||(n_1, ..., n_k)||_ord`` of non-negative per-tensor norms, in float64 on the host, without over/underflow.

    ``ord = 2`` is ``math.hypot`` (scaled internally, accurate to about one ulp); other orders divide the peak out
    first, so that no power overflows. NaN when an entry is NaN, else inf when one is inf.
    """
    if not norms:
        return 0.0
    if any(math.isnan(n) for n in norms):
        return math.nan
    if ord == 2:
        return math.hypot(*norms)
    peak = max(norms)
    if math.isinf(ord) or math.isinf(peak) or peak == 0.0:
        return peak
    if ord == 1:
        return math.fsum(norms)
    return peak * math.fsum((n / peak) ** ord for n in norms) ** (1.0 / ord)


def global_norm(buckets: Buckets, ord: float, reduce: ShardReduce | None = None) -> float:
    """``||concat(buckets)||_ord`` as a Python float (float32-or-wider per tensor, float64 across; one host sync).

    With ``reduce`` the buckets are this rank's shards and the norm is taken over every rank's (one all-reduce).
    """
    local = combine_norms(tensor_norm_values(buckets, ord), ord)
    return local if reduce is None else reduce.norm(local, ord)


def all_finite(tensors: Sequence[Tensor], reduce: ShardReduce | None = None) -> bool:
    """Whether every entry of every tensor (on one device) is finite: one fused pass and one host sync.

    Uses the kernel ``GradScaler`` checks gradients with, multiplying by exactly 1 (so nothing changes); where the
    kernel does not take the tensors (complex ones, or dtypes a device's kernel does not mix) it checks each tensor.
    """
    local = _all_finite_here(tensors)
    return local if reduce is None else reduce.all_true(local)


def _all_finite_here(tensors: Sequence[Tensor]) -> bool:
    if not tensors:
        return True
    found, one = torch.zeros(1, device=tensors[0].device), torch.ones(1, device=tensors[0].device)
    try:
        torch._amp_foreach_non_finite_check_and_unscale_(list(tensors), found, one)
    except (NotImplementedError, RuntimeError):
        return all(bool(torch.isfinite(t).all()) for t in tensors)
    return not bool(found.item())


def dual_norm(buckets: Buckets, p: float, reduce: ShardReduce | None = None) -> float:
    """``||h||_q``: the first-order gain ``max_{||ε||_p ≤ 1} <h, ε>``; inf or nan when ``h`` is not finite.

    For a general ``p`` the q-norm is evaluated on ``h / ||h||_∞`` so that ``|h|^q`` neither overflows nor
    underflows when ``q`` is large (``p`` close to 1).
    """
    if p == 2:
        return global_norm(buckets, 2.0, reduce)
    q = dual_exponent(p)
    if q in (1.0, math.inf):
        return global_norm(buckets, q, reduce)
    h_max = global_norm(buckets, math.inf, reduce)
    if not math.isfinite(h_max) or h_max == 0.0:
        return h_max
    return h_max * global_norm([torch._foreach_div(tensors, h_max) for tensors in buckets], q, reduce)


def unit_ascent(
    buckets: Buckets, p: float, h_dual_norm: float, reduce: ShardReduce | None = None
) -> tuple[list[list[Tensor]], float]:
    """The maximiser of ``<h, d>`` over ``||d||_p ≤ 1`` as ``coefficient * directions``.

    Returns ``(directions, coefficient)`` with the same bucket structure as ``buckets``; the perturbation is
    ``ε = ρ · coefficient · directions``. Splitting off the scalar lets the caller fuse it into one
    ``_foreach_add_(params, directions, alpha=ρ·coefficient)``; for ``p = 2`` the directions are ``h`` itself
    (no copy) unless ``1/||h||`` is not a safe scalar (or the buckets are shards: the choice must not depend on
    what one rank holds). ``h_dual_norm`` must be ``dual_norm(buckets, p, reduce)``, finite and positive.
    """
    if not (math.isfinite(h_dual_norm) and h_dual_norm > 0.0):
        raise ValueError(f"unit_ascent needs a finite, positive dual norm, got {h_dual_norm}")
    if p == 2:
        if reduce is None and _is_safe_scalar(1.0 / h_dual_norm, buckets):
            return [list(tensors) for tensors in buckets], 1.0 / h_dual_norm
        h_max = global_norm(buckets, math.inf, reduce)  # ||h/h_max|| is in [1, √n]: 1/it is a safe scalar
        return [list(torch._foreach_div(tensors, h_max)) for tensors in buckets], h_max / h_dual_norm
    if math.isinf(p):
        return [list(torch._foreach_sign(tensors)) for tensors in buckets], 1.0
    if p == 1:
        return _unit_ascent_l1(buckets, h_dual_norm, reduce)
    q = dual_exponent(p)
    h_max = global_norm(buckets, math.inf, reduce)
    u_q_norm = h_dual_norm / h_max
    directions = []
    for tensors in buckets:
        u = torch._foreach_div(tensors, h_max)
        d = torch._foreach_abs(u)
        torch._foreach_pow_(d, q - 1.0)
        torch._foreach_mul_(d, torch._foreach_sign(u))
        directions.append(list(d))
    return directions, 1.0 / u_q_norm ** (q - 1.0)


def _is_safe_scalar(value: float, buckets: Buckets) -> bool:
    """Whether ``value`` (times a moderate ρ) is a normal number in every bucket's dtype, with room to spare.

    ``torch._foreach_*`` casts a scalar to the tensors' dtype, so ``1/||h||`` for a huge ``||h||`` would be a
    subnormal (imprecise) or zero float16/bfloat16/float32 number, and for a tiny one it would overflow.
    """
    for tensors in buckets:
        if tensors:
            info = torch.finfo(tensors[0].dtype)
            if not info.tiny * 2.0**12 <= value <= info.max * 2.0**-12:
                return False
    return True


def _unit_ascent_l1(buckets: Buckets, h_max: float, reduce: ShardReduce | None) -> tuple[list[list[Tensor]], float]:
    """``p = 1``: all mass on the largest ``|h_j|``, shared equally between ties (mask = 1 + sign(|h| - max|h|))."""
    directions, ties = [], 0.0
    for tensors in buckets:
        mask = torch._foreach_sub(torch._foreach_abs(tensors), h_max)
        torch._foreach_sign_(mask)
        torch._foreach_add_(mask, 1)
        ties += float(torch.stack(torch._foreach_norm(mask, 1, dtype=torch.float64)).sum())
        torch._foreach_mul_(mask, torch._foreach_sign(tensors))
        directions.append(list(mask))
    return directions, 1.0 / (ties if reduce is None else reduce.sum(ties))
