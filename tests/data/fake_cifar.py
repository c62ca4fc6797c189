"""Tiny fake CIFAR folders in the real python-pickle format (the layout of the official archives)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CIFAR10_PER_BATCH = 4  # 5 training batches -> 20 training images
CIFAR10_TEST = 6
CIFAR100_TRAIN = 12
CIFAR100_TEST = 5


@dataclass(frozen=True)
class FakeCifar:
    """A fake CIFAR copy on disk and the raw arrays written to it (training batches concatenated in order)."""

    parent: Path  # the folder holding cifar-10-batches-py / cifar-100-python
    folder: Path  # the folder holding the pickles
    train_data: np.ndarray  # uint8 (N, 3072)
    train_labels: np.ndarray  # int64 (N,)
    test_data: np.ndarray
    test_labels: np.ndarray


def write_cifar_batch(path: Path, data: np.ndarray, labels: list[int], label_key: str) -> None:
    """One pickle laid out like the official files (bytes keys, a uint8 array and a list of ints)."""
    batch = {
        b"batch_label": path.name.encode(),
        label_key.encode(): list(labels),
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    if label_key == "fine_labels":
        batch[b"coarse_labels"] = [label // 5 for label in labels]
    # The official files were written by Python 2 and NumPy 1, whose arrays refer to numpy.core.multiarray.
    path.write_bytes(pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    data[:, :1024] //= 2  # make the red channel darker so the three channel means clearly differ
    return data


def build_cifar10(parent: Path, seed: int = 0) -> FakeCifar:
    rng = np.random.default_rng(seed)
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_data, train_labels = [], []
    for i in range(1, 6):
        data = _images(rng, CIFAR10_PER_BATCH)
        labels = rng.integers(0, 10, size=CIFAR10_PER_BATCH)
        if i == 5:
            labels[0] = 9  # the top class occurs
        write_cifar_batch(folder / f"data_batch_{i}", data, labels.tolist(), "labels")
        train_data.append(data)
        train_labels.append(labels)
    test_data = _images(rng, CIFAR10_TEST)
    test_labels = rng.integers(0, 10, size=CIFAR10_TEST)
    write_cifar_batch(folder / "test_batch", test_data, test_labels.tolist(), "labels")
    return FakeCifar(
        parent,
        folder,
        np.concatenate(train_data),
        np.concatenate(train_labels).astype(np.int64),
        test_data,
        test_labels,
    )


def build_cifar100(parent: Path, seed: int = 1) -> FakeCifar:
    rng = np.random.default_rng(seed)
    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    train_data, test_data = _images(rng, CIFAR100_TRAIN), _images(rng, CIFAR100_TEST)
    train_labels = rng.integers(0, 100, size=CIFAR100_TRAIN)
    train_labels[0] = 99
    test_labels = rng.integers(0, 100, size=CIFAR100_TEST)
    write_cifar_batch(folder / "train", train_data, train_labels.tolist(), "fine_labels")
    write_cifar_batch(folder / "test", test_data, test_labels.tolist(), "fine_labels")
    return FakeCifar(parent, folder, train_data, train_labels.astype(np.int64), test_data, test_labels)
