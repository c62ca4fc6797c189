"""Measure a model without changing it: mode policy, and exact restoration of modes and buffers.

A measurement must leave the model exactly as it found it (parameters, buffers, gradients, train/eval mode of
every module), also when it raises. Parameters are never written by the measurements here (Hessian-vector
products use ``torch.autograd.grad``, which does not touch ``.grad``); buffers can change in train mode
(BatchNorm running statistics), so they are snapshotted and copied back.

Mode policy (papers.md §6: BatchNorm and dropout make the loss non-deterministic, so a measurement says which
mode it used):

- ``"eval"`` (default): every module in eval mode; BatchNorm uses its running statistics, dropout is off.
- ``"train"``: every module in train mode except dropout layers (off); normalisation layers normalise with the
  batch statistics and do not update their running statistics (``track_running_stats`` is off during the
  measurement, which also lets ``torch.func`` transforms run); the buffers are restored afterwards in any case.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

Mode = Literal["eval", "train"]
MODES = ("eval", "train")
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@contextmanager
def measurement_mode(model: nn.Module, mode: Mode = "eval") -> Iterator[None]:
    """Put ``model`` in the measurement ``mode`` for the body; restore every module's mode and every buffer after.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    >>> with measurement_mode(model, "eval"):
    ...     model.training
    False
    >>> model.training
    True
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    flags = [(module, module.training) for module in model.modules()]
    tracking = [(m, m.track_running_stats) for m in model.modules() if isinstance(m, _NormBase)]
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        if mode == "eval":
            model.eval()
        else:
            model.train()
            for module in model.modules():
                if isinstance(module, _DROPOUT):
                    module.eval()
            for module, _ in tracking:
                module.track_running_stats = False
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                # Copy back only what changed: an unneeded copy would bump the buffer's version counter and
                # invalidate autograd graphs that saved it (HessianOperator's cached graph).
                if not torch.equal(buffer, saved):
                    buffer.copy_(saved)
        for module, training in flags:
            module.training = training
        for module, track in tracking:
            module.track_running_stats = track
