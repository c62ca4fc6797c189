"""Build an optimizer by name: what the CLI and the experiments use.

Every name builds on SGD with momentum (the base of the SAM paper's experiments) unless it says otherwise:

- ``sgd``: ``torch.optim.SGD``;
- ``adam``: ``torch.optim.AdamW`` (decoupled weight decay);
- ``sam``: :class:`~sharpness.optim.SAM` around SGD (Foret et al., 2021);
- ``asam``: :class:`~sharpness.optim.SAM` with ``adaptive=True`` around SGD (Kwon et al., 2021).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from sharpness.optim.sam import SAM

OPTIMIZERS = ("sgd", "adam", "sam", "asam")
SAM_FAMILY = ("sam", "asam")
"""Names whose steps take a second (perturbed) pass; they take ``rho``."""


def _sgd(params, *, lr: float, momentum: float, weight_decay: float, **_: Any) -> Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _adam(params, *, lr: float, weight_decay: float, **_: Any) -> Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _sam(adaptive: bool) -> Callable[..., Optimizer]:
    def build(params, *, lr: float, momentum: float, weight_decay: float, rho: float, model: nn.Module) -> Optimizer:
        return SAM(
            params,
            torch.optim.SGD,
            rho=rho,
            adaptive=adaptive,
            model=model,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
        )

    return build


_BUILDERS: dict[str, Callable[..., Optimizer]] = {
    "sgd": _sgd,
    "adam": _adam,
    "sam": _sam(adaptive=False),
    "asam": _sam(adaptive=True),
}


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    rho: float = 0.05,
) -> Optimizer:
    """The optimizer ``name`` (one of :data:`OPTIMIZERS`) over all of ``model``'s parameters.

    SAM-family optimizers get ``model`` so that BatchNorm statistics stay out of their perturbed pass.
    """
    key = name.lower()
    if key not in _BUILDERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    if not lr > 0:
        raise ValueError(f"the learning rate must be > 0, got {lr}")
    return _BUILDERS[key](model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, rho=rho, model=model)
