"""Shared fixtures for the data tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fake_cifar import FakeCifar, build_cifar10, build_cifar100


@pytest.fixture(scope="session")
def cifar10(tmp_path_factory: pytest.TempPathFactory) -> FakeCifar:
    """A read-only fake CIFAR-10 (do not modify; use ``make_cifar10`` for a copy to break)."""
    return build_cifar10(tmp_path_factory.mktemp("cifar10"))


@pytest.fixture(scope="session")
def cifar100(tmp_path_factory: pytest.TempPathFactory) -> FakeCifar:
    return build_cifar100(tmp_path_factory.mktemp("cifar100"))


@pytest.fixture
def make_cifar10(tmp_path: Path) -> Callable[[], FakeCifar]:
    """A fresh fake CIFAR-10 under this test's tmp_path, free to corrupt."""
    return lambda: build_cifar10(tmp_path / "fresh")
