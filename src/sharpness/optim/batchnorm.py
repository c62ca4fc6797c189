"""Keep normalisation layers' running statistics out of SAM's second (perturbed) pass.

SAM (Foret et al., 2021, §3 and App. C) computes BatchNorm's running statistics from the first, unperturbed
forward pass only. :func:`frozen_bn` makes any forward pass inside it leave the running statistics
(``running_mean``, ``running_var``, ``num_batches_tracked``) of every normalisation layer exactly as they were,
while the layers still normalise with the batch statistics in training mode.

It works by an exact snapshot and restore of those buffers, not by setting ``momentum = 0``: that common trick
still increments ``num_batches_tracked`` and is wrong for ``momentum=None`` (cumulative averaging), and it
does not cover ``InstanceNorm`` with tracked statistics. Any module deriving from
``torch.nn.modules.batchnorm._NormBase`` (BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*, lazy variants) is
covered.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from sharpness.optim.snapshot import TensorSnapshot

_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def running_stat_buffers(model: nn.Module) -> list[Tensor]:
    """The running-statistics buffers of every normalisation layer of ``model`` that tracks them."""
    return [
        buffer
        for module in model.modules()
        if isinstance(module, _NormBase) and module.track_running_stats
        for name in _STAT_BUFFERS
        if (buffer := getattr(module, name, None)) is not None
    ]


class BatchNormStatsGuard:
    """Reusable save/restore of a model's running statistics (what :func:`frozen_bn` does, without the ``with``).

    The list of buffers is looked up on every :meth:`save`, so modules added or moved (``model.to``) after
    construction are handled; the copy storage is reused while the buffers stay the same objects.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self._snapshot = TensorSnapshot()

    def save(self) -> None:
        self._snapshot.save(running_stat_buffers(self.model))

    def restore(self) -> None:
        self._snapshot.restore()


@contextmanager
def frozen_bn(model: nn.Module) -> Iterator[None]:
    """Run the body without changing any running statistics of ``model``'s normalisation layers.

    Example (the second SAM pass)::

        with frozen_bn(model):
            loss_fn(model(x), y).backward()

    The statistics are restored even if the body raises.

    >>> import torch
    >>> bn = torch.nn.BatchNorm1d(2)
    >>> with frozen_bn(bn):
    ...     _ = bn(torch.randn(8, 2) + 5.0)
    >>> bn.running_mean.tolist()
    [0.0, 0.0]
    """
    guard = BatchNormStatsGuard(model)
    guard.save()
    try:
        yield
    finally:
        guard.restore()
