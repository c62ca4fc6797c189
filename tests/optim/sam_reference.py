"""An independent, deliberately plain re-implementation of one SAM step, for the tests to compare against.

It works on the concatenation of all parameters as one flat vector and follows papers.md §1 literally:
per-element formulas, no foreach, no buckets, no in-place tricks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def lp_perturbation(h: Tensor, rho: float | Tensor, p: float) -> Tensor:
    """ε̂ = ρ sign(h)|h|^{q-1} / (||h||_q^q)^{1/p} (p = 2, ∞, 1 and general p), with ρ per element allowed."""
    if p == 2:
        return rho * h / h.norm(2)
    if math.isinf(p):
        return rho * torch.sign(h)
    if p == 1:
        top = (h.abs() == h.abs().max()).to(h.dtype)
        return rho * torch.sign(h) * top / top.sum()
    q = p / (p - 1)
    return rho * torch.sign(h) * h.abs() ** (q - 1) / (h.abs() ** q).sum() ** (1 / p)


def flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, offset = [], 0
    for t in like:
        out.append(vector[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def sam_gradient(
    loss_of: Callable[[list[Tensor]], Tensor],
    weights: Sequence[Tensor],
    rho: Sequence[float],
    p: float = 2.0,
    adaptive: Sequence[bool] | None = None,
    eta: float = 0.01,
    weight_decay: Sequence[float] | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """(perturbation ε̂, gradient at w + ε̂) for ``loss_of(list_of_weights)``; per-tensor ρ, ASAM flag and λ."""
    w = [t.detach().clone().requires_grad_(True) for t in weights]
    g = flat(torch.autograd.grad(loss_of(w), w))
    w_flat = flat([t.detach() for t in w])
    per_element = lambda values: flat([torch.full_like(t, float(v)) for t, v in zip(w, values, strict=True)])  # noqa: E731
    if weight_decay is not None:
        g = g + per_element(weight_decay) * w_flat
    t_w = torch.ones_like(w_flat)
    if adaptive is not None:
        t_w = torch.where(per_element(adaptive) > 0, w_flat.abs() + eta, t_w)
    eps = t_w * lp_perturbation(t_w * g, per_element(rho), p)
    w_pert = [(t.detach() + e).requires_grad_(True) for t, e in zip(w, unflat(eps, w), strict=True)]
    g_sam = torch.autograd.grad(loss_of(w_pert), w_pert)
    return unflat(eps, w), list(g_sam)
