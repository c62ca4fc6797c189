"""MNIST-1D, generated procedurally on the spot (nothing is downloaded).

MNIST-1D (Greydanus, "Scaling down Deep Learning", 2020, arXiv 2011.14439) is a small stand-in for MNIST:
each example is a 1-D signal of 40 values, made from one of 10 hand-designed templates (the class, 0-9)
by random padding, translation, scaling, shear, correlated noise and i.i.d. noise. It trains in seconds on a
CPU, yet separates model families and optimizers far better than MNIST does (the paper reports roughly 30 % test
accuracy for a linear model, 70 % for a small MLP and above 90 % for a small CNN).

:func:`load_mnist1d` builds the data set with the reference generator of the ``mnist1d`` package
(``mnist1d.data.make_dataset``) with that package's default transformation settings, so with the default
arguments it reproduces the standard 4000 / 1000 train / test split. It never calls
``mnist1d.data.get_dataset``, which downloads a pickle from GitHub. The generator seeds Python's ``random``
and NumPy's global random state; :func:`load_mnist1d` saves both states and restores them afterwards, so
loading has no side effect on the caller's random number streams. Generation takes a few seconds; results
are cached per process, keyed on the arguments.

For :func:`sharpness.data.load_dataset` (name ``"mnist1d"``), :func:`load_source` wraps :func:`load_mnist1d`.
There, the data themselves are fixed by the options ``num_samples`` (5000), ``train_fraction`` (0.8) and
``data_seed`` (42, the reference seed): ``load_dataset``'s ``seed`` only drives the validation split and the
label noise, so every run sees the same standard train / test examples.

The generator, the ``mnist1d`` package, is a dependency of ``sharpness``.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sharpness.checks import check_integer, check_real
from sharpness.data.source import SourceData

__all__ = ["Mnist1D", "load_mnist1d", "load_source"]

NUM_CLASSES = 10


@dataclass(frozen=True)
class Mnist1D:
    """One MNIST-1D train / test split.

    Attributes:
        x_train: ``float32`` tensor of shape ``(n_train, 40)``; the whole data set (train and test together)
            is centred and scaled to unit standard deviation by the generator.
        y_train: ``int64`` tensor of shape ``(n_train,)``, class labels in ``0..9``.
        x_test: ``float32`` tensor of shape ``(n_test, 40)``.
        y_test: ``int64`` tensor of shape ``(n_test,)``.

    The dataclass is frozen, but tensors are mutable: each :func:`load_mnist1d` call returns fresh copies of
    the cached data, so modifying them in place never affects later calls.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES

    def __repr__(self) -> str:
        return f"Mnist1D(train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)}, num_classes={NUM_CLASSES})"


def load_mnist1d(num_samples: int = 5000, train_fraction: float = 0.8, seed: int = 42) -> Mnist1D:
    """Generate MNIST-1D (defaults: the standard 4000 train / 1000 test examples, seed 42).

    Args:
        num_samples: total number of examples, train and test together (at least 10). The generator makes
            ``num_samples // 10`` examples of each class, so a value that is not a multiple of 10 is rounded
            down to one.
        train_fraction: fraction of the (shuffled) examples that go to the training split,
            ``0 < train_fraction < 1``; the training split has ``int(n * train_fraction)`` examples.
        seed: seed of the generator; the same arguments always give identical tensors.

    Returns:
        A :class:`Mnist1D` with fresh tensors (safe to modify; the in-process cache keeps its own copy).

    Raises:
        ValueError: for an invalid argument, or one that leaves a split empty.
        ImportError: if the ``mnist1d`` package is not installed.
    """
    num_samples, train_fraction, seed = _check_args(num_samples, train_fraction, seed)
    cached = _generate(num_samples, train_fraction, seed)
    return Mnist1D(
        x_train=cached.x_train.clone(),
        y_train=cached.y_train.clone(),
        x_test=cached.x_test.clone(),
        y_test=cached.y_test.clone(),
    )


def _check_args(num_samples: object, train_fraction: object, seed: object) -> tuple[int, float, int]:
    owner = "load_mnist1d"
    num_samples = check_integer(
        num_samples, "num_samples", owner=owner, low=NUM_CLASSES, what="at least one example per class"
    )
    train_fraction = check_real(
        train_fraction, "train_fraction", owner=owner, low=0.0, high=1.0, low_open=True, high_open=True
    )
    seed = check_integer(seed, "seed", owner=owner, low=0, high=2**32 - 1)
    total = (num_samples // NUM_CLASSES) * NUM_CLASSES
    n_train = int(total * train_fraction)
    if n_train == 0 or n_train == total:
        raise ValueError(
            f"load_mnist1d: num_samples={num_samples} with train_fraction={train_fraction} leaves the "
            f"{'training' if n_train == 0 else 'test'} split empty; use more samples or a fraction "
            "closer to 0.5"
        )
    return num_samples, train_fraction, seed


def _import_generator():  # -> tuple[make_dataset, get_dataset_args]
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise ImportError(
            "load_mnist1d needs the 'mnist1d' package (a dependency of sharpness) to generate the data: "
            f"pip install mnist1d. Import failed with: {exc}"
        ) from exc
    return make_dataset, get_dataset_args


@functools.lru_cache(maxsize=8)
def _generate(num_samples: int, train_fraction: float, seed: int) -> Mnist1D:
    make_dataset, get_dataset_args = _import_generator()
    args = get_dataset_args()
    args.num_samples = num_samples
    args.train_split = train_fraction
    args.seed = seed
    # make_dataset seeds and draws from the global `random` and `numpy.random` states: leave them as found.
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return Mnist1D(
        x_train=torch.as_tensor(np.asarray(data["x"], dtype=np.float32)),
        y_train=torch.as_tensor(np.asarray(data["y"], dtype=np.int64)),
        x_test=torch.as_tensor(np.asarray(data["x_test"], dtype=np.float32)),
        y_test=torch.as_tensor(np.asarray(data["y_test"], dtype=np.int64)),
    )


def load_source(
    *,
    seed: int,
    data_dir: Path | None,
    augment: bool,
    num_samples: int = 5000,
    train_fraction: float = 0.8,
    data_seed: int = 42,
) -> SourceData:
    """MNIST-1D for :func:`sharpness.data.load_dataset`: inputs ``(N, 40)`` float32, 10 classes.

    ``seed``, ``data_dir`` and ``augment`` are unused: the examples are fixed by the options (``data_seed``, not
    the run's ``seed``), nothing is read from disk, and 1-D signals get no image augmentation.
    """
    del seed, data_dir, augment
    data_seed = check_integer(data_seed, "data_seed", owner="load_dataset('mnist1d')", low=0)
    data = load_mnist1d(num_samples=num_samples, train_fraction=train_fraction, seed=data_seed)
    return SourceData(
        x_train=data.x_train,
        y_train=data.y_train,
        x_test=data.x_test,
        y_test=data.y_test,
        num_classes=NUM_CLASSES,
        info={
            "source": "MNIST-1D (Greydanus 2020), generated with the mnist1d package",
            "num_samples": num_samples,
            "train_fraction": train_fraction,
            "data_seed": data_seed,
            "normalisation": "centred and scaled to unit std over all examples by the mnist1d generator",
        },
    )
