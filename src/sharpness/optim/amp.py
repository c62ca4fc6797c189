"""What SAM needs to know about a ``torch.amp.GradScaler``: the loss scale its gradients carry right now.

A ``GradScaler`` multiplies the loss by its scale ``S`` before ``backward``, so gradients are ``S g`` until
``scaler.unscale_(optimizer)`` divides them (torch's clipping recipe calls it before ``scaler.step``). The scaler
records per optimizer whether it has unscaled that optimizer's gradients; SAM reads this record so that a
statistic of ``g`` (the policy's ``s_t = ||g||²``, :attr:`SAM.last_grad_norm`) is the same with and without the
scaler, and so that gradients are never unscaled twice. The record lives in a private attribute of
``GradScaler`` (stable since torch 1.6); without it SAM assumes the gradients are still scaled.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from torch.amp.grad_scaler import OptState
except ImportError:  # torch < 2.3
    from torch.cuda.amp.grad_scaler import OptState  # type: ignore[no-redef]


def _states(scaler: Any) -> dict[int, dict[str, Any]] | None:
    return getattr(scaler, "_per_optimizer_states", None)


def is_active(scaler: torch.amp.GradScaler | None) -> bool:
    """A scaler that is given and enabled (a disabled scaler is a no-op, as in torch)."""
    return scaler is not None and scaler.is_enabled()


def was_unscaled(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` already ran since the last ``scaler.update()``."""
    states = _states(scaler)
    return states is not None and id(optimizer) in states and states[id(optimizer)]["stage"] is OptState.UNSCALED


def loss_scale(scaler: torch.amp.GradScaler | None, optimizer: torch.optim.Optimizer) -> float:
    """The factor the gradients of ``optimizer`` carry now: the scaler's scale, or 1 (no scaler, or unscaled)."""
    if not is_active(scaler) or was_unscaled(scaler, optimizer):
        return 1.0
    return float(scaler.get_scale())


def adopt_unscale(scaler: torch.amp.GradScaler, owner: torch.optim.Optimizer, inner: torch.optim.Optimizer) -> None:
    """If the user unscaled ``inner`` (SAM's base optimizer) rather than ``owner`` (SAM), record it for ``owner``.

    Both hold the same parameters; the scaler keys its record by optimizer object, so without this
    ``scaler.step(owner)`` would divide the gradients by the scale a second time.
    """
    states = _states(scaler)
    if states is not None and was_unscaled(scaler, inner) and not was_unscaled(scaler, owner):
        states[id(owner)] = states.pop(id(inner))
