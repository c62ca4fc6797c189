"""Data for examples, tests, benchmarks and the ``sharpness`` CLI.

* :func:`load_dataset` / :class:`Dataset` / :data:`DATASETS`: one entry point for every data set
  (``mnist1d``, ``digits``, ``cifar10``, ``cifar100``, ``synthetic``), with a seeded validation split and
  symmetric label noise;
* :class:`Augmentation`: batched random crop / flip / cutout for training images;
* :func:`iterate_batches` / :func:`num_batches`: mini-batches sliced from in-memory tensors;
* :func:`load_mnist1d` / :class:`Mnist1D`: MNIST-1D generated locally.

Only CIFAR is read from disk (a local copy, ``data_dir``); nothing is ever downloaded.
"""

from sharpness.data.augment import Augmentation
from sharpness.data.batches import iterate_batches, num_batches
from sharpness.data.dataset import DATASETS, Dataset, load_dataset
from sharpness.data.mnist1d import Mnist1D, load_mnist1d

__all__ = [
    "DATASETS",
    "Augmentation",
    "Dataset",
    "Mnist1D",
    "iterate_batches",
    "load_dataset",
    "load_mnist1d",
    "num_batches",
]
