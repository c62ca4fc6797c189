"""sharpness.data.load_mnist1d: shapes, determinism, no RNG side effects, argument checks."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

pytest.importorskip("mnist1d", reason="needs the mnist1d package: pip install mnist1d")

from sharpness.data import Mnist1D, load_mnist1d  # noqa: E402
from sharpness.data import mnist1d as mnist1d_module  # noqa: E402

SMALL = 300  # generation time is proportional to num_samples; keep the uncached calls cheap


@pytest.fixture(scope="module")
def standard() -> Mnist1D:
    return load_mnist1d()


def test_standard_split_shapes_and_dtypes(standard: Mnist1D) -> None:
    assert standard.x_train.shape == (4000, 40)
    assert standard.x_test.shape == (1000, 40)
    assert standard.y_train.shape == (4000,)
    assert standard.y_test.shape == (1000,)
    assert standard.x_train.dtype == standard.x_test.dtype == torch.float32
    assert standard.y_train.dtype == standard.y_test.dtype == torch.int64
    assert torch.isfinite(standard.x_train).all() and torch.isfinite(standard.x_test).all()
    for labels in (standard.y_train, standard.y_test):
        assert labels.min() >= 0 and labels.max() <= 9
        assert set(labels.tolist()) == set(range(10))  # every class present in both splits
    assert standard.num_classes == 10


def test_cached_result_cannot_be_corrupted_by_caller(standard: Mnist1D) -> None:
    first = load_mnist1d()
    first.x_train.zero_()
    first.y_test.fill_(3)
    again = load_mnist1d()
    assert torch.equal(again.x_train, standard.x_train)
    assert torch.equal(again.y_test, standard.y_test)
    assert again.x_train.abs().sum() > 0


def test_same_seed_is_deterministic_and_seed_matters() -> None:
    mnist1d_module._generate.cache_clear()
    a = load_mnist1d(SMALL, seed=3)
    mnist1d_module._generate.cache_clear()  # force a second generation rather than a cache hit
    b = load_mnist1d(SMALL, seed=3)
    c = load_mnist1d(SMALL, seed=4)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.x_train, c.x_train)


def test_global_rng_states_are_unchanged() -> None:
    random.seed(1234)
    np.random.seed(1234)
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    mnist1d_module._generate.cache_clear()  # make sure the generator really runs
    load_mnist1d(SMALL, seed=11)
    assert random.getstate() == python_state
    after = np.random.get_state()
    assert after[0] == numpy_state[0]
    np.testing.assert_array_equal(after[1], numpy_state[1])
    assert after[2:] == numpy_state[2:]
    # and the streams continue exactly as if nothing had been called
    random.seed(1234)
    np.random.seed(1234)
    expected = (random.random(), np.random.rand())
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    assert (random.random(), np.random.rand()) == expected


@pytest.mark.parametrize(("num_samples", "train_fraction", "n_train"), [(SMALL, 0.5, 150), (SMALL, 0.9, 270)])
def test_split_sizes_follow_train_fraction(num_samples: int, train_fraction: float, n_train: int) -> None:
    data = load_mnist1d(num_samples, train_fraction=train_fraction)
    assert len(data.x_train) == len(data.y_train) == n_train
    assert len(data.x_test) == len(data.y_test) == num_samples - n_train
    assert data.x_train.shape[1] == data.x_test.shape[1] == 40


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_samples": 9},
        {"num_samples": 0},
        {"num_samples": -100},
        {"num_samples": 100.0},
        {"num_samples": True},
        {"train_fraction": 0.0},
        {"train_fraction": 1.0},
        {"train_fraction": -0.2},
        {"train_fraction": 1.5},
        {"train_fraction": float("nan")},
        {"seed": -1},
        {"seed": 1.5},
        {"num_samples": 10, "train_fraction": 0.05},  # empty training split
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="load_mnist1d"):
        load_mnist1d(**kwargs)


def test_missing_package_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    mnist1d_module._generate.cache_clear()
    monkeypatch.setitem(sys.modules, "mnist1d", None)  # makes `import mnist1d...` raise ImportError
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match="pip install mnist1d"):
        load_mnist1d(SMALL, seed=99)
