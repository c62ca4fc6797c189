"""Teacher-student data: Gaussian inputs labelled by a fixed random network (for tests and theory).

In the teacher-student setting (Gardner & Derrida 1989; Saad & Solla 1995; e.g. Goldt et al., "Dynamics of
stochastic gradient descent for two-layer neural networks in the teacher-student setup", NeurIPS 2019) the
inputs are i.i.d. standard Gaussian vectors and the targets come from a fixed "teacher" network, so the
Bayes-optimal predictor is known and the data can be made as small or large as a test needs.

The teacher is a one-hidden-layer tanh network ``f(x) = W2 tanh(W1 x)`` with Gaussian weights scaled by
``1/sqrt(fan_in)`` (``hidden=0`` makes it linear, ``f(x) = W x``). Everything (teacher weights, train and test
inputs, target noise) is drawn from one :class:`torch.Generator` seeded with ``data_seed``, which defaults to
the run's ``seed``.

* ``task="classification"`` (default): labels ``argmax f(x)`` over ``num_classes`` outputs (default 4), int64.
  Classes are not exactly balanced.
* ``task="regression"``: targets ``f(x) + noise * eps``, ``eps`` standard Gaussian, float32 of shape
  ``(N, num_classes)`` (default output dimension 1, ``noise`` 0.1). Test targets carry the same noise (they
  are draws from the same distribution), so the best achievable test MSE per output is ``noise ** 2``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from sharpness.checks import check_integer, check_real
from sharpness.data.source import SourceData

__all__ = ["TASKS", "load_source", "task_of"]

TASKS = ("classification", "regression")


def task_of(task: object = "classification") -> str:
    """Check the ``task`` option (before anything is generated) and return it."""
    if task not in TASKS:
        raise ValueError(f"load_dataset('synthetic'): task must be one of {', '.join(TASKS)}, got {task!r}")
    return str(task)


def load_source(
    *,
    seed: int,
    data_dir: Path | None,
    augment: bool,
    task: str = "classification",
    n_train: int = 512,
    n_test: int = 256,
    dim: int = 20,
    num_classes: int | None = None,
    noise: float = 0.1,
    hidden: int = 32,
    data_seed: int | None = None,
) -> SourceData:
    """Teacher-student data for :func:`sharpness.data.load_dataset` (``data_dir`` and ``augment`` unused)."""
    del data_dir, augment
    where = "load_dataset('synthetic')"
    task = task_of(task)
    n_train = check_integer(n_train, "n_train", owner=where, low=1)
    n_test = check_integer(n_test, "n_test", owner=where, low=1)
    dim = check_integer(dim, "dim", owner=where, low=1)
    hidden = check_integer(hidden, "hidden", owner=where, low=0)
    if num_classes is None:
        num_classes = 4 if task == "classification" else 1
    num_classes = check_integer(num_classes, "num_classes", owner=where, low=2 if task == "classification" else 1)
    noise = check_real(noise, "noise", owner=where, low=0.0)
    data_seed = seed if data_seed is None else check_integer(data_seed, "data_seed", owner=where, low=0)

    generator = torch.Generator().manual_seed(data_seed)
    if hidden:
        w1 = torch.randn(dim, hidden, generator=generator) / math.sqrt(dim)
        w2 = torch.randn(hidden, num_classes, generator=generator) / math.sqrt(hidden)

        def teacher(x: Tensor) -> Tensor:
            return torch.tanh(x @ w1) @ w2

    else:
        w = torch.randn(dim, num_classes, generator=generator) / math.sqrt(dim)

        def teacher(x: Tensor) -> Tensor:
            return x @ w

    x_train = torch.randn(n_train, dim, generator=generator)
    x_test = torch.randn(n_test, dim, generator=generator)
    out_train, out_test = teacher(x_train), teacher(x_test)
    if task == "classification":
        y_train, y_test = out_train.argmax(dim=1), out_test.argmax(dim=1)
    else:
        y_train = out_train + noise * torch.randn(out_train.shape, generator=generator)
        y_test = out_test + noise * torch.randn(out_test.shape, generator=generator)
    return SourceData(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=num_classes,
        task=task,  # type: ignore[arg-type]
        info={
            "source": "teacher-student: Gaussian inputs, random " + ("tanh MLP" if hidden else "linear") + " teacher",
            "dim": dim,
            "hidden": hidden,
            "data_seed": data_seed,
            **({"noise": float(noise)} if task == "regression" else {}),
        },
    )
