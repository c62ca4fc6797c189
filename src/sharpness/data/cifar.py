"""CIFAR-10 and CIFAR-100 from a local copy of the "python version" of the data (nothing is downloaded).

Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", tech. report, University of Toronto,
2009; https://www.cs.toronto.edu/~kriz/cifar.html. Both sets hold 50000 training and 10000 test colour images
of 32x32 pixels, in 10 classes (CIFAR-10) or 100 "fine" classes (CIFAR-100).

Expected files, in the folder given as ``data_dir`` (the CLI's ``--data-dir``), or in the subfolder that the
official archive extracts to (so the parent folder works too):

* CIFAR-10 (``cifar-10-python.tar.gz`` -> ``cifar-10-batches-py/``): ``data_batch_1`` ... ``data_batch_5``
  and ``test_batch``; each a pickle of a dict with ``b"data"`` (uint8, N x 3072, the 1024 red, then green,
  then blue values of each image, row-major) and ``b"labels"`` (N integers in 0..9).
* CIFAR-100 (``cifar-100-python.tar.gz`` -> ``cifar-100-python/``): ``train`` and ``test``, the same format
  with ``b"fine_labels"`` (0..99); the 20 coarse labels are not used.

Inputs are float32 ``(N, 3, 32, 32)``, scaled to [0, 1] and then normalised per channel with the mean and
(population) standard deviation of the training images, computed from the files rather than hard-coded (for
the full CIFAR-10 training set they are the usual ``(0.4914, 0.4822, 0.4465)`` and ``(0.2470, 0.2435,
0.2616)``); they include any validation examples that :func:`sharpness.data.load_dataset` later holds out.

The standard augmentation (random crop with 4 pixels of zero padding, random horizontal flip; option
``cutout`` adds a cutout hole of that size) is on unless ``augment=False``.

The pickles are read with a restricted unpickler that only rebuilds plain containers and NumPy arrays (the
only objects these files contain), so a tampered file cannot run code when loaded.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sharpness.checks import check_integer
from sharpness.data.augment import Augmentation
from sharpness.data.source import SourceData

__all__ = ["load_cifar10_source", "load_cifar100_source"]

_LAYOUT: dict[str, dict[str, Any]] = {
    "cifar10": {
        "subdir": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test": "test_batch",
        "label_key": "labels",
        "num_classes": 10,
    },
    "cifar100": {
        "subdir": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ("train",),
        "test": "test",
        "label_key": "fine_labels",
        "num_classes": 100,
    },
}
_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_PIXELS = 3 * 32 * 32

# Everything a CIFAR pickle (written by Python 2 or 3, NumPy 1 or 2) may refer to.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


def load_cifar10_source(*, seed: int, data_dir: str | Path | None, augment: bool, cutout: int = 0) -> SourceData:
    """CIFAR-10 for :func:`sharpness.data.load_dataset` (``seed`` is unused: the split is the official one)."""
    del seed
    return _load("cifar10", data_dir, augment, cutout)


def load_cifar100_source(*, seed: int, data_dir: str | Path | None, augment: bool, cutout: int = 0) -> SourceData:
    """CIFAR-100 (fine labels) for :func:`sharpness.data.load_dataset` (``seed`` is unused)."""
    del seed
    return _load("cifar100", data_dir, augment, cutout)


def _load(name: str, data_dir: str | Path | None, augment: bool, cutout: int) -> SourceData:
    layout = _LAYOUT[name]
    cutout = check_integer(cutout, "cutout", owner=f"load_dataset({name!r})", low=0)
    if cutout and not augment:
        raise ValueError(f"load_dataset({name!r}): cutout={cutout} needs augmentation on (augment=True or None)")
    folder = find_folder(name, data_dir)
    parts = [_read_batch(name, folder / file) for file in layout["train"]]
    x_train = _to_images(np.concatenate([data for data, _ in parts]))
    y_train = torch.as_tensor(np.concatenate([labels for _, labels in parts]))
    test_data, test_labels = _read_batch(name, folder / layout["test"])
    x_test = _to_images(test_data)
    y_test = torch.as_tensor(test_labels)

    mean = x_train.mean(dim=(0, 2, 3))
    std = x_train.std(dim=(0, 2, 3), correction=0).clamp_min(1e-12)
    for x in (x_train, x_test):
        x.sub_(mean[:, None, None]).div_(std[:, None, None])
    return SourceData(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=layout["num_classes"],
        augment=Augmentation(crop_padding=4, flip=True, cutout=cutout) if augment else None,
        info={
            "source": f"{name.upper()} (Krizhevsky 2009), python version read from {folder}",
            "folder": str(folder),
            "mean": tuple(mean.tolist()),
            "std": tuple(std.tolist()),
        },
    )


def expected_files(name: str) -> tuple[str, ...]:
    """The file names a CIFAR folder must contain (training batches first, then the test batch)."""
    layout = _LAYOUT[name]
    return (*layout["train"], layout["test"])


def find_folder(name: str, data_dir: str | Path | None) -> Path:
    """The folder holding the CIFAR files: ``data_dir`` itself, or its ``cifar-10-batches-py`` /
    ``cifar-100-python`` subfolder. Raises a ValueError without ``data_dir``, a FileNotFoundError naming the
    folder and each missing file otherwise."""
    layout = _LAYOUT[name]
    files = expected_files(name)
    described = f"{', '.join(files)} (from {layout['archive']}, {_URL}, extracted)"
    if data_dir is None:
        raise ValueError(
            f"{name} is read from local files: pass --data-dir (data_dir=...) with the folder holding {described}, "
            f"or the parent folder holding {layout['subdir']}/"
        )
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: data folder {root} (--data-dir) does not exist or is not a folder")
    candidates = [folder for folder in (root, root / layout["subdir"]) if folder.is_dir()]
    # The candidate with the most expected files (ties: data_dir itself) is the one to use or to report on.
    folder = max(candidates, key=lambda f: (sum((f / file).is_file() for file in files), f == root))
    missing = [file for file in files if not (folder / file).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name}: missing {', '.join(missing)} in {folder} (searched {' and '.join(map(str, candidates))}); "
            f"--data-dir must be the folder holding {described}, or the parent folder holding {layout['subdir']}/"
        )
    return folder


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} (a CIFAR pickle holds only arrays and lists)")


def _read_batch(name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(data uint8 (N, 3072), labels int64 (N,))`` from one CIFAR pickle, with errors that name the file."""
    try:
        with open(path, "rb") as f:
            batch = _RestrictedUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # a corrupt pickle can fail in many ways (EOFError, UnpicklingError, ValueError...)
        raise ValueError(f"{name}: cannot read {path}: not a valid CIFAR pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{name}: {path} holds a {type(batch).__name__}, expected a dict with data and labels")
    label_key = _LAYOUT[name]["label_key"]
    data, labels = _entry(name, path, batch, "data"), _entry(name, path, batch, label_key)
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise ValueError(
            f"{name}: {path}: 'data' must be a uint8 array of shape (N, {_PIXELS}), "
            f"got {data.dtype} of shape {data.shape}"
        )
    try:
        labels = np.asarray(labels)
    except Exception as exc:
        raise ValueError(f"{name}: {path}: cannot read {label_key!r} as an array ({exc})") from exc
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{name}: {path}: {label_key!r} must hold {data.shape[0]} integer labels (one per image), "
            f"got {labels.dtype} of shape {labels.shape}"
        )
    num_classes = _LAYOUT[name]["num_classes"]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name}: {path}: {label_key!r} must be in 0..{num_classes - 1}, "
            f"got values from {labels.min()} to {labels.max()}"
        )
    return data, labels.astype(np.int64)


def _entry(name: str, path: Path, batch: dict, key: str) -> Any:
    for candidate in (key.encode(), key):  # bytes keys (encoding="bytes"), or str keys from a Python 3 pickle
        if candidate in batch:
            return batch[candidate]
    found = ", ".join(repr(k) for k in batch)
    raise ValueError(f"{name}: {path} has no {key!r} entry (found keys: {found})")


def _to_images(data: np.ndarray) -> Tensor:
    """uint8 ``(N, 3072)`` -> float32 ``(N, 3, 32, 32)`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32).float().div_(255.0)
