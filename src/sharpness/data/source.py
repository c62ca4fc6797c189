"""What a data set module hands to :func:`sharpness.data.load_dataset`, and shared argument checks.

Each data set module (``mnist1d``, ``digits``, ``cifar``, ``synthetic``) exposes a loader that returns a
:class:`SourceData`: the fixed train / test split, already normalised, before any validation split or label
noise (those are applied uniformly by :mod:`sharpness.data.dataset`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

from sharpness.data.augment import Augmentation

__all__ = ["SourceData", "check_int", "check_fraction"]

Task = Literal["classification", "regression"]


@dataclass
class SourceData:
    """A data set's full training split and its test split, as produced by a loader."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    task: Task = "classification"
    augment: Augmentation | None = None
    info: dict[str, Any] = field(default_factory=dict)


def check_int(where: str, name: str, value: object, minimum: int) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool) ``>= minimum``; else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{where}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_fraction(where: str, name: str, value: object, *, low_open: bool = False) -> float:
    """``value`` as a ``float`` in ``[0, 1)`` (``(0, 1)`` with ``low_open``); else a ValueError naming the range."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(value)
        and (0 < value < 1 if low_open else 0 <= value < 1)
    )
    if not ok:
        interval = "0 < {0} < 1" if low_open else "0 <= {0} < 1"
        raise ValueError(f"{where}: {name} must be a number with {interval.format(name)}, got {value!r}")
    return float(value)
