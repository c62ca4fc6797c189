"""Mini-batches sliced straight from in-memory tensors (no ``DataLoader``, no worker processes).

Every data set here fits in memory, so an epoch is one :func:`torch.randperm` (drawn from the caller's
:class:`torch.Generator`, never the global RNG) followed by indexing; without shuffling the batches are
plain slices (views, no copy).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from sharpness.checks import check_integer

__all__ = ["iterate_batches", "num_batches"]


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Number of batches :func:`iterate_batches` yields for ``n`` examples.

    ``n // batch_size`` with ``drop_last``, else ``ceil(n / batch_size)``.
    """
    batch_size = check_integer(batch_size, "batch_size", low=1)
    n = check_integer(n, "n", owner="num_batches", low=0)
    return n // batch_size if drop_last else -(-n // batch_size)


def iterate_batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x_batch, y_batch)`` pairs covering one epoch.

    Args:
        x, y: tensors with the same first dimension (the examples), on any device.
        batch_size: examples per batch, at least 1; the last batch is smaller unless ``drop_last``.
        shuffle: visit the examples in a random order (one ``torch.randperm`` per call, i.e. per epoch).
        generator: source of the permutation when shuffling; the same generator state gives the same order.
            ``None`` uses PyTorch's global generator (not reproducible unless seeded globally).
        drop_last: skip the final incomplete batch, so every batch has exactly ``batch_size`` examples.

    Arguments are checked, and the permutation drawn, when the function is called (not lazily on the first
    ``next``), so calling it advances ``generator`` even if the iterator is never consumed.
    """
    batch_size = check_integer(batch_size, "batch_size", low=1)
    if x.shape[:1] != y.shape[:1]:
        raise ValueError(
            f"iterate_batches: x and y must hold the same number of examples, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    n = x.shape[0]
    stop = n - n % batch_size if drop_last else n
    order: Tensor | None = None
    if shuffle:
        device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=device).to(x.device)
    return _batches(x, y, batch_size, stop, order)


def _batches(x: Tensor, y: Tensor, batch_size: int, stop: int, order: Tensor | None) -> Iterator[tuple[Tensor, Tensor]]:
    for start in range(0, stop, batch_size):
        if order is None:
            yield x[start : start + batch_size], y[start : start + batch_size]
        else:
            index = order[start : start + batch_size]
            yield x[index], y[index.to(y.device)]
