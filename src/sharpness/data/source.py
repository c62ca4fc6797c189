"""What a data set module hands to :func:`sharpness.data.load_dataset`.

Each data set module (``mnist1d``, ``digits``, ``cifar``, ``synthetic``) exposes a loader that returns a
:class:`SourceData`: the fixed train / test split, already normalised, before any validation split or label
noise (those are applied uniformly by :mod:`sharpness.data.dataset`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

from sharpness.data.augment import Augmentation

__all__ = ["SourceData"]

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
