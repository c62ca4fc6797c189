"""The measurement set of a curvature operator: ``(x, y)`` batches, re-iterated for every product.

Accepted ``data`` (for :class:`~sharpness.curvature.operator.HessianOperator`,
:class:`~sharpness.curvature.gauss_newton.GGNOperator` and
:class:`~sharpness.curvature.gauss_newton.EmpiricalFisherOperator`):

- one batch: an ``(x, y)`` tuple or an ``[x, y]`` list whose first element is a tensor;
- a list or tuple of batches;
- any re-iterable of batches, e.g. a ``torch.utils.data.DataLoader`` (its batches may be tuples or lists, as the
  default collate function makes them). It is iterated once per product.

A one-shot iterator (a generator, ``iter(loader)``, ``map(...)``) cannot be iterated again for the next product
and is refused. ``y`` must be a tensor with a batch dimension: its length is the batch's example count, by which
the batches are weighted. The local example count is known after the first complete pass; every later pass
must yield the same count (a loader whose epochs differ in size would silently change the operator).

Bounded sets (one batch, or a list/tuple of at most :data:`MAX_CACHED_BATCHES` batches) have stable batch indices,
so an operator may keep per-batch state across products (``HessianOperator``'s cached gradient graphs); for any
other set an operator keeps at most one batch's graph alive at a time, whatever the number of batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from torch import Tensor

MAX_CACHED_BATCHES = 8
Batch = tuple[Any, Tensor]


class MeasurementSet:
    """Iterate a measurement set as ``(index, x, y)`` triples, counting its examples (see the module docstring).

    Attributes:
        bounded: the set is one batch or a list/tuple of at most :data:`MAX_CACHED_BATCHES` batches.
        num_examples: the number of examples (``Σ len(y)``), ``None`` until the first complete pass.
    """

    def __init__(self, data: Batch | Sequence[Batch] | Iterable[Batch]) -> None:
        self._source, self.bounded = _normalise(data)
        self.num_examples: int | None = None

    def __iter__(self) -> Iterator[tuple[int, Any, Tensor]]:
        count = 0
        for index, batch in enumerate(self._source):
            x, y = _as_pair(batch, index)
            count += _batch_size(y, index)
            yield index, x, y
        self._end_pass(count)

    def _end_pass(self, count: int) -> None:
        if self.num_examples is None:
            self.num_examples = count
        elif count != self.num_examples:
            raise ValueError(
                f"the measurement set yielded {count} examples on this pass but {self.num_examples} on the first; "
                "pass data that yields the same examples every time (a list, or a DataLoader of a fixed dataset)"
            )


def is_single_batch(data: Any) -> bool:
    """``(x, y)`` or ``[x, y]`` with ``x`` a tensor: one batch, not a sequence of two batches."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor)


def _normalise(data: Any) -> tuple[Iterable[Any], bool]:
    """The re-iterable of batches behind ``data`` and whether it is bounded; raises on what cannot be measured."""
    if isinstance(data, Tensor):
        raise TypeError("data is a single tensor; pass an (x, y) batch, a list of batches or a DataLoader")
    if is_single_batch(data):
        return [tuple(data)], True
    if isinstance(data, (tuple, list)):
        if not data:
            raise ValueError("the measurement set is empty; pass an (x, y) batch or a list of them")
        return list(data), len(data) <= MAX_CACHED_BATCHES
    if isinstance(data, Iterator):
        raise TypeError(
            f"data is a one-shot iterator ({type(data).__name__}) that cannot be re-iterated for every product; "
            "pass a list of batches or a DataLoader"
        )
    if not (hasattr(data, "__iter__") or hasattr(data, "__getitem__")):
        raise TypeError(f"data must be an (x, y) batch, a list of batches or a DataLoader, got {type(data).__name__}")
    return data, False


def _as_pair(batch: Any, index: int) -> Batch:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"batch {index} is a {type(batch).__name__}, not an (x, y) pair; every batch must be (x, y)")
    return batch[0], batch[1]


def _batch_size(y: Any, index: int) -> int:
    if not isinstance(y, Tensor) or y.ndim == 0:
        what = "a 0-dim tensor" if isinstance(y, Tensor) else type(y).__name__
        raise TypeError(
            f"batch {index} has targets y = {what}; y must be a tensor with a batch dimension "
            "(a Dataset of single examples needs a DataLoader around it)"
        )
    return int(y.shape[0])
