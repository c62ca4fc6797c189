"""The :class:`Dataset` container and :func:`load_dataset`: data set registry, validation split, label noise.

:func:`load_dataset` loads a data set's fixed train / test split (one module per data set: :mod:`.mnist1d`,
:mod:`.digits`, :mod:`.cifar`, :mod:`.synthetic`), then, in this order and driven only by ``seed``:

1. **Label noise** (``label_noise > 0``, classification only): symmetric noise (:mod:`.noise`; as in the
   SAM paper's label-noise experiments, Foret et al. 2021, §3.3) on the *whole* training split, exactly
   ``round(label_noise * n)`` labels, each moved to a different class. The test labels are never touched.
2. **Validation split** (``val_split > 0``): ``round(val_split * n)`` training examples, chosen by a seeded
   permutation, are held out as the validation set (kept in their original order; no stratification).

Because the noise comes first, the validation labels are noisy at the same rate as the training labels: a
validation set carved out of noisy training data is noisy too, and cleaning it would take information a real
experiment does not have. Validation accuracy therefore measures agreement with noisy labels; only the test
set (always clean) measures accuracy on the true labels. ``clean_y_train`` keeps the true training labels
and ``noisy_mask`` marks which ones were corrupted, e.g. to measure memorisation.

Noise and split draw from two independent generators derived from ``seed``, so with the same seed the
validation examples are the same with or without noise, and the corrupted examples are the same whatever
``val_split`` is. The data themselves do not depend on ``seed`` (fixed splits), except for ``synthetic``,
whose teacher and inputs are drawn from ``seed`` unless its ``data_seed`` option is given.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from sharpness.checks import check_bool, check_integer, check_real
from sharpness.data import cifar, digits, mnist1d, synthetic
from sharpness.data.augment import Augmentation
from sharpness.data.noise import symmetric_label_noise
from sharpness.data.source import SourceData

__all__ = ["DATASETS", "Dataset", "load_dataset"]


@dataclass(frozen=True, repr=False)
class Dataset:
    """A loaded data set: training, optional validation and test splits, plus what a training loop needs.

    Attributes:
        name: the registry name (one of :data:`DATASETS`).
        task: ``"classification"`` (labels int64 of shape ``(N,)``) or ``"regression"`` (targets float32 of
            shape ``(N, num_classes)``).
        x_train, y_train: the training split, after the validation examples were removed; labels are noisy
            when label noise was requested.
        x_val, y_val: the validation split (labels noisy like the training labels), or ``None`` when
            ``val_split == 0``.
        x_test, y_test: the test split (labels always clean).
        num_classes: number of classes; for regression, the output dimension.
        input_shape: shape of one example, e.g. ``(40,)``, ``(1, 8, 8)``, ``(3, 32, 32)``.
        augment: augmentation for *training* batches (``augment(x, generator)``), or ``None``.
        clean_y_train: the training labels before label noise, aligned with ``x_train``; ``None`` without noise.
        info: details of how the data were made (source, normalisation statistics, noise counts, sizes...).
    """

    name: str
    task: Literal["classification", "regression"]
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor | None
    y_val: Tensor | None
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    augment: Augmentation | None = None
    clean_y_train: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if (x is None) != (y is None):
                raise ValueError(f"Dataset: x_{split} and y_{split} must both be tensors or both be None")
            if x is not None and x.shape[0] != y.shape[0]:
                raise ValueError(f"Dataset: x_{split} has {x.shape[0]} examples but y_{split} has {y.shape[0]}")
        if self.clean_y_train is not None and self.clean_y_train.shape != self.y_train.shape:
            raise ValueError("Dataset: clean_y_train must have the shape of y_train")

    @property
    def noisy_mask(self) -> Tensor:
        """Bool tensor ``(n_train,)``: which training labels label noise changed (all False without noise)."""
        if self.clean_y_train is None:
            return torch.zeros(self.y_train.shape[0], dtype=torch.bool, device=self.y_train.device)
        return self.y_train != self.clean_y_train

    def __repr__(self) -> str:
        val = "none" if self.x_val is None else str(self.x_val.shape[0])
        noise = f", label_noise={self.info['label_noise']}" if self.info.get("label_noise") else ""
        return (
            f"Dataset({self.name!r}, task={self.task}, train={self.x_train.shape[0]}, val={val}, "
            f"test={self.x_test.shape[0]}, input_shape={self.input_shape}, num_classes={self.num_classes}"
            f"{noise}, augment={self.augment!r})"
        )


@dataclass(frozen=True)
class _Entry:
    loader: Callable[..., SourceData]  # loader(*, seed, data_dir, augment, **options) -> SourceData
    image: bool  # inputs are (C, H, W) images, so augmentation is possible
    augment_default: bool
    task_of: Callable[[dict[str, Any]], str] = lambda options: "classification"

    @property
    def options(self) -> tuple[str, ...]:
        params = inspect.signature(self.loader).parameters
        return tuple(p for p in params if p not in ("seed", "data_dir", "augment"))


_REGISTRY: dict[str, _Entry] = {
    "mnist1d": _Entry(mnist1d.load_source, image=False, augment_default=False),
    "digits": _Entry(digits.load_source, image=True, augment_default=False),
    "cifar10": _Entry(cifar.load_cifar10_source, image=True, augment_default=True),
    "cifar100": _Entry(cifar.load_cifar100_source, image=True, augment_default=True),
    "synthetic": _Entry(
        synthetic.load_source,
        image=False,
        augment_default=False,
        task_of=lambda options: synthetic.task_of(options.get("task", "classification")),
    ),
}

DATASETS: tuple[str, ...] = tuple(_REGISTRY)
"""Names accepted by :func:`load_dataset`."""

_NOISE_STREAM, _SPLIT_STREAM = 1, 2


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    val_split: float = 0.0,
    label_noise: float = 0.0,
    data_dir: str | Path | None = None,
    augment: bool | None = None,
    **options: Any,
) -> Dataset:
    """Load a data set by name, with an optional seeded validation split and symmetric label noise.

    Args:
        name: one of :data:`DATASETS`: ``"mnist1d"``, ``"digits"``, ``"cifar10"``, ``"cifar100"``, ``"synthetic"``.
        seed: integer >= 0 driving the label noise and the validation split (and the ``synthetic`` data).
        val_split: fraction of the training split held out for validation, ``0 <= val_split < 1``.
        label_noise: fraction of training labels corrupted, ``0 <= label_noise < 1`` (classification only);
            applied before the validation split, so the validation labels are noisy too (see module docs).
        data_dir: folder with the CIFAR files (the CLI's ``--data-dir``); ignored by the other data sets.
        augment: training-batch augmentation; ``None`` is the data set's default (on for CIFAR, off
            otherwise). ``True`` needs image inputs (``digits``, ``cifar10``, ``cifar100``).
        **options: data-set specific options:

            * ``mnist1d``: ``num_samples`` (5000), ``train_fraction`` (0.8), ``data_seed`` (42);
            * ``digits``: ``test_fraction`` (0.2), ``cutout`` (0);
            * ``cifar10`` / ``cifar100``: ``cutout`` (0, the side of the cutout hole);
            * ``synthetic``: ``task`` ("classification" or "regression"), ``n_train`` (512), ``n_test`` (256),
              ``dim`` (20), ``num_classes`` (4, or the output dimension 1 for regression), ``noise`` (0.1,
              regression target noise std), ``hidden`` (32 teacher tanh units; 0 = linear teacher),
              ``data_seed`` (defaults to ``seed``).

    Raises:
        ValueError: unknown name or option, an argument out of range, label noise on a regression task
            (all checked before anything is loaded); missing ``data_dir`` or a corrupt file for CIFAR.
        FileNotFoundError: the CIFAR folder or one of its files does not exist.
    """
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    where = f"load_dataset({name!r})"
    seed = check_integer(seed, "seed", owner=where, low=0, high=2**63 - 1)
    val_split = check_real(val_split, "val_split", owner=where, low=0.0, high=1.0, high_open=True)
    label_noise = check_real(label_noise, "label_noise", owner=where, low=0.0, high=1.0, high_open=True)
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        valid = ", ".join(entry.options) or "none"
        raise ValueError(f"{where}: unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    task = entry.task_of(options)
    if task == "regression" and label_noise > 0:
        raise ValueError(
            f"{where}: label_noise must be 0 for a regression task (its targets are real-valued), got {label_noise}"
        )
    if augment is None:
        augment = entry.augment_default
    augment = check_bool(augment, "augment", owner=where, what="or None for the data set's default", error=ValueError)
    if augment and not entry.image:
        raise ValueError(f"{where}: augment=True needs image inputs; {name} has none (image data sets: digits, cifar)")

    source = entry.loader(seed=seed, data_dir=data_dir, augment=augment, **options)
    return _finish(name, source, seed=seed, val_split=val_split, label_noise=label_noise)


def _generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for one purpose (``stream``), independent of the others derived from the same seed."""
    state = np.random.SeedSequence([seed, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _finish(name: str, source: SourceData, *, seed: int, val_split: float, label_noise: float) -> Dataset:
    x, y = source.x_train, source.y_train
    n = x.shape[0]
    clean: Tensor | None = None
    if label_noise > 0:
        clean = y
        y = symmetric_label_noise(y, label_noise, source.num_classes, _generator(seed, _NOISE_STREAM))

    x_val = y_val = None
    n_val = round(val_split * n)
    if val_split > 0:
        if not 0 < n_val < n:
            raise ValueError(
                f"load_dataset({name!r}): val_split={val_split} of {n} training examples leaves an empty "
                f"{'validation' if n_val == 0 else 'training'} split"
            )
        order = torch.randperm(n, generator=_generator(seed, _SPLIT_STREAM))
        val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
        x_val, y_val = x[val_idx], y[val_idx]
        x, y = x[train_idx], y[train_idx]
        if clean is not None:
            clean = clean[train_idx]

    info = dict(source.info)
    info.update(
        seed=seed,
        val_split=val_split,
        n_train=x.shape[0],
        n_val=n_val,
        n_test=source.x_test.shape[0],
        label_noise=label_noise,
        augment=repr(source.augment) if source.augment is not None else None,
    )
    if clean is not None:
        n_noisy_train = int((y != clean).sum())
        info.update(
            noisy_total=round(label_noise * n),  # over train + validation: exactly the requested rate
            noisy_train=n_noisy_train,
            noisy_val=round(label_noise * n) - n_noisy_train,
        )
    return Dataset(
        name=name,
        task=source.task,
        x_train=x,
        y_train=y,
        x_val=x_val,
        y_val=y_val,
        x_test=source.x_test,
        y_test=source.y_test,
        num_classes=source.num_classes,
        input_shape=tuple(x.shape[1:]),
        augment=source.augment,
        clean_y_train=clean,
        info=info,
    )
