"""scikit-learn's bundled handwritten digits: 1797 grey-scale 8x8 images of the digits 0-9.

The data (UCI "Optical Recognition of Handwritten Digits", Alpaydin & Kaynak 1998; the test part of the
original set) ship inside scikit-learn (``sklearn.datasets.load_digits``), so nothing is downloaded. It is the
smallest real *image* data set here: a small CNN trains on it in seconds on a CPU.

Split and preprocessing:

* A fixed test split: ``round(test_fraction * 1797)`` examples (359 by default), chosen by a permutation with
  the constant seed :data:`SPLIT_SEED`, *not* the run's ``seed``, so every run is evaluated on the same test
  images; the rest (1438) is the training split.
* Pixels (0..16) are scaled to [0, 1], then standardised with the mean and standard deviation of all
  training-split pixels (one scalar each: the images have one channel, and some border pixels are constant,
  so per-pixel statistics would divide by zero). The statistics include any validation examples that
  :func:`sharpness.data.load_dataset` later holds out of the training split, so the inputs do not depend on
  ``val_split``.
* Inputs are float32 ``(N, 1, 8, 8)``, labels int64.

Augmentation is off by default. With ``augment=True`` it is a random crop with 1 pixel of padding (4 pixels
would move an 8x8 digit half out of the frame) and *no* horizontal flip (a mirrored digit is not the same
digit), plus the optional ``cutout`` option.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sharpness.checks import check_integer, check_real
from sharpness.data.augment import Augmentation
from sharpness.data.source import SourceData

__all__ = ["SPLIT_SEED", "load_source"]

SPLIT_SEED = 0
"""Seed of the fixed train / test permutation (the same for every run)."""

NUM_CLASSES = 10


def load_source(
    *, seed: int, data_dir: Path | None, augment: bool, test_fraction: float = 0.2, cutout: int = 0
) -> SourceData:
    """The digits data for :func:`sharpness.data.load_dataset` (``seed`` and ``data_dir`` are unused)."""
    del seed, data_dir
    where = "load_dataset('digits')"
    test_fraction = check_real(
        test_fraction, "test_fraction", owner=where, low=0.0, high=1.0, low_open=True, high_open=True
    )
    cutout = check_integer(cutout, "cutout", owner=where, low=0)
    if cutout and not augment:
        raise ValueError(f"{where}: cutout={cutout} needs augmentation on (augment=True)")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "the 'digits' data set needs scikit-learn, a dependency of sharpness: pip install scikit-learn. "
            f"Import failed with: {exc}"
        ) from exc

    bunch = load_digits()
    x = torch.as_tensor(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.as_tensor(np.asarray(bunch.target, dtype=np.int64))
    n = x.shape[0]
    n_test = round(test_fraction * n)
    if not 0 < n_test < n:
        raise ValueError(f"{where}: test_fraction={test_fraction} leaves an empty split of the {n} images")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    test_idx, train_idx = order[:n_test].sort().values, order[n_test:].sort().values
    x_train, x_test = x[train_idx], x[test_idx]
    mean, std = x_train.mean().item(), x_train.std().item()
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std
    return SourceData(
        x_train=x_train,
        y_train=y[train_idx],
        x_test=x_test,
        y_test=y[test_idx],
        num_classes=NUM_CLASSES,
        augment=Augmentation(crop_padding=1, flip=False, cutout=cutout) if augment else None,
        info={
            "source": "scikit-learn load_digits (UCI optical recognition of handwritten digits)",
            "test_fraction": test_fraction,
            "split_seed": SPLIT_SEED,
            "mean": mean,
            "std": std,
        },
    )
