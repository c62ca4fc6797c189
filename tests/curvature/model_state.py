"""Test helper: a complete record of a model's state, to check that a measurement left it exactly as found."""

from __future__ import annotations

import torch
from torch import nn


def snapshot_state(model: nn.Module) -> dict:
    """Parameters, gradients, buffers, every module's train flag and BatchNorm's track_running_stats."""
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "grads": {k: None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "modes": [m.training for m in model.modules()],
        "tracking": [getattr(m, "track_running_stats", None) for m in model.modules()],
    }


def assert_state_unchanged(model: nn.Module, before: dict) -> None:
    """Bitwise-equal parameters, buffers and gradients (None stays None), and the same flags."""
    after = snapshot_state(model)
    for key in ("params", "buffers"):
        for name, value in before[key].items():
            assert torch.equal(after[key][name], value), (key, name)
    for name, grad in before["grads"].items():
        now = after["grads"][name]
        assert (now is None) == (grad is None) and (grad is None or torch.equal(now, grad)), name
    assert after["modes"] == before["modes"] and after["tracking"] == before["tracking"]
