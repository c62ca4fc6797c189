"""Reuse: what an ERM (one-pass) step of a SAM-family optimizer does with information from past SAM steps.

Without reuse an ERM step is the base optimizer's step on the plain gradient ``g``. :class:`LookSAMReuse` is
LookSAM's (Liu, Mai, Chen, Hsieh, You, CVPR 2022, Alg. 1): on each SAM step it stores the component of the SAM
gradient ``g_s`` orthogonal to the gradient ``g`` of the same step,

    g_v = g_s - (<g_s, g> / ||g||²) g,

and on ERM steps it replaces ``g`` by

    g + α (||g|| / ||g_v||) g_v,

i.e. it adds the stored "sharpness direction" with a length of ``α ||g||``. Norms are global by default
(``per_tensor=False``) or per parameter tensor. Before the first SAM step there is no ``g_v`` and an ERM step
uses ``g`` alone. The direction of ``g_v`` and the ratio are invariant to a common scale of the gradients, so a
``GradScaler``'s loss scale does not change the update.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sharpness.optim.perturbation import Buckets, global_norm


class LookSAMReuse:
    """LookSAM's gradient reuse with weight ``alpha`` (see the module docstring)."""

    def __init__(self, alpha: float = 0.7, per_tensor: bool = False) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha >= 0:
            raise ValueError(f"LookSAMReuse: alpha must be a number >= 0, got {alpha!r}")
        self.alpha, self.per_tensor = float(alpha), per_tensor
        self.g_v: dict[Tensor, Tensor] = {}  # parameter -> stored orthogonal component
        self._first: dict[Tensor, Tensor] = {}  # parameter -> gradient at w of the current SAM step

    def save_first_gradient(self, params: Buckets, grads: Buckets) -> None:
        """Keep ``g`` of a SAM step (the first pass's gradient is zeroed before the second pass)."""
        self._first = {p: g.detach().clone() for p, g in _pairs(params, grads)}

    @torch.no_grad()
    def update(self, params: Buckets, sam_grads: Buckets) -> None:
        """After a SAM step's second pass: ``g_v = g_s - (<g_s, g>/||g||²) g`` from the saved ``g``."""
        keys, g_s, g = _matched(params, sam_grads, self._first)
        g_norm_sq = global_norm(g, 2.0) ** 2 if g else 0.0
        coefficient = _global_dot(g_s, g) / g_norm_sq if g_norm_sq > 0 else 0.0
        self.g_v = {}
        for bucket_keys, gs_bucket, g_bucket in zip(keys, g_s, g, strict=True):
            g_v = torch._foreach_add(gs_bucket, g_bucket, alpha=-coefficient)
            self.g_v.update(zip(bucket_keys, g_v, strict=True))
        self._first = {}

    @torch.no_grad()
    def apply(self, params: Buckets, grads: Buckets) -> None:
        """On an ERM step, in place: ``g += α (||g|| / ||g_v||) g_v`` (a no-op before the first SAM step)."""
        if not self.g_v or self.alpha == 0.0:
            return
        _, g, g_v = _matched(params, grads, self.g_v)
        if not g:
            return
        if self.per_tensor:
            for g_list, v_list in zip(g, g_v, strict=True):
                v_norms = torch._foreach_norm(v_list)
                torch._foreach_clamp_min_(v_norms, torch.finfo(v_norms[0].dtype).tiny)  # g_v = 0 adds nothing
                ratios = torch._foreach_div(torch._foreach_norm(g_list), v_norms)
                torch._foreach_mul_(ratios, self.alpha)
                torch._foreach_add_(g_list, torch._foreach_mul(v_list, ratios))
            return
        v_norm = global_norm(g_v, 2.0)
        if v_norm == 0.0:
            return
        scale = self.alpha * global_norm(g, 2.0) / v_norm
        for g_list, v_list in zip(g, g_v, strict=True):
            torch._foreach_add_(g_list, v_list, alpha=scale)

    def state_dict(self, param_order: list[Tensor]) -> dict[str, Any]:
        """``g_v`` by the parameters' positions in ``param_order`` (as optimizer state dicts do)."""
        index = {p: i for i, p in enumerate(param_order)}
        return {"alpha": self.alpha, "per_tensor": self.per_tensor, "g_v": {index[p]: v for p, v in self.g_v.items()}}

    def load_state_dict(self, state: dict[str, Any], param_order: list[Tensor]) -> None:
        self.alpha, self.per_tensor = state["alpha"], state["per_tensor"]
        self.g_v = {param_order[int(i)]: v.to(param_order[int(i)]) for i, v in state["g_v"].items()}

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


def _global_dot(a: Buckets, b: Buckets) -> float:
    """``<a, b>`` over all buckets by the polarisation identity ``(||a+b||² - ||a-b||²) / 4`` (foreach only)."""
    plus = [torch._foreach_add(x, y) for x, y in zip(a, b, strict=True)]
    minus = [torch._foreach_sub(x, y) for x, y in zip(a, b, strict=True)]
    return (global_norm(plus, 2.0) ** 2 - global_norm(minus, 2.0) ** 2) / 4.0
