"""An independent, plain re-implementation of the whole SAM family's step, for the matrix tests.

Everything is a flat float64 vector of the trainable parameters (complex ones as real pairs), each formula is
written as in papers.md §1–2 and the preset docstrings, with no buckets, no foreach and no shared code with
``sharpness.optim``. The base optimizer is torch's own (it is not under test), stepping float64 copies.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call


@dataclass
class Spec:
    """Which family member: its policy and reuse settings (the presets' defaults unless given)."""

    policy: str = "always"  # always | every_k | bernoulli | adaptive
    k: int = 2
    prob: float = 0.5
    seed: int = 0
    adaptive_asam: bool = False
    rho: float = 0.05
    alpha: float | None = None  # LookSAM's reuse weight, None: no reuse
    delta: float = 0.9
    lambda1: float = -1.0
    lambda2: float = 1.0
    total_steps: int = 10
    eta: float = 0.01


@dataclass
class ReferenceRun:
    """A float64 copy of ``model`` trained by the reference algorithm (:meth:`step` per batch)."""

    model: nn.Module
    spec: Spec
    base: Callable[..., torch.optim.Optimizer]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    t: int = 0
    g_v: Tensor | None = None
    mean: float = 0.0
    var: float = 0.0
    generator: torch.Generator = field(default_factory=torch.Generator)
    sam_steps: int = 0

    def __post_init__(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self.base(self.params)
        self.generator.manual_seed(self.spec.seed)
        self.maximize = bool(self.optimizer.param_groups[0].get("maximize", False))

    def _grad(self, weights: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        leaves = [w.detach().clone().requires_grad_(True) for w in weights]
        out = functional_call(self.model, dict(zip(names, leaves, strict=True)), (x,))
        grads = torch.autograd.grad(self.loss_fn(out, y), leaves, allow_unused=True)
        return _flat([torch.zeros_like(w) if g is None else g for w, g in zip(leaves, grads, strict=True)])

    def _decide(self, g: Tensor) -> bool:
        spec = self.spec
        if spec.policy == "always":
            return True
        if spec.policy == "every_k":
            return self.t % spec.k == 0
        if spec.policy == "bernoulli":
            return bool(torch.rand((), generator=self.generator) < spec.prob)
        s = float(g @ g)
        c = (
            min(self.t / spec.total_steps, 1.0) * spec.lambda1
            + (1 - min(self.t / spec.total_steps, 1.0)) * spec.lambda2
        )
        if self.t == 0:
            self.mean, self.var = s, 0.0
        else:
            self.mean = spec.delta * self.mean + (1 - spec.delta) * s
            self.var = spec.delta * self.var + (1 - spec.delta) * (s - self.mean) ** 2
        return s >= self.mean + c * math.sqrt(self.var)

    def _epsilon(self, g: Tensor, w: Tensor) -> Tensor:
        h = -g if self.maximize else g
        t_w = torch.ones_like(w)
        if self.spec.adaptive_asam:
            scaled = _flat([torch.full_like(p, float(p.ndim >= 2)) for p in self.params]) > 0
            t_w = torch.where(scaled, w.abs() + self.spec.eta, t_w)
        th = t_w * h
        return self.spec.rho * t_w * th / th.norm() if th.norm() > 0 else torch.zeros_like(w)

    def step(self, x: Tensor, y: Tensor) -> None:
        x = x.to(torch.float64) if x.is_floating_point() else x
        y = y.to(torch.float64) if y.is_floating_point() else y
        weights = [p.detach() for p in self.params]
        g = self._grad(weights, x, y)
        if self._decide(g):
            w = _flat(weights)
            g_s = self._grad(_unflat(w + self._epsilon(g, w), weights), x, y)
            if self.spec.alpha is not None:
                self.g_v = g_s - (g_s @ g) / (g @ g) * g
            update, self.sam_steps = g_s, self.sam_steps + 1
        else:
            update = g
            if self.spec.alpha is not None and self.g_v is not None and self.g_v.norm() > 0:
                update = g + self.spec.alpha * g.norm() / self.g_v.norm() * self.g_v
        for p, u in zip(self.params, _unflat(update, weights), strict=True):
            p.grad = u.clone()
        self.optimizer.step()
        self.t += 1


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([_real(t).reshape(-1).to(torch.float64) for t in tensors])


def _unflat(vector: Tensor, like: list[Tensor]) -> list[Tensor]:
    out, offset = [], 0
    for t in like:
        real = _real(t)
        piece = vector[offset : offset + real.numel()].view(real.shape)
        out.append(torch.view_as_complex(piece.clone()) if t.is_complex() else piece)
        offset += real.numel()
    return out
