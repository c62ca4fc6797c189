"""HessianOperator over a data-parallel process group: 2 spawned ranks (gloo), each with part of the measurement
set (10 and 6 examples), give λ_max, the trace, the spectral density, the loss and the gradient of a
single-process operator on the union of the data (float64); so do the GGN and empirical Fisher products."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from distributed_runs import data, gauss_newton_products, measure, model, spawn

from sharpness.curvature import HessianOperator


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return spawn(world_size=2)


@pytest.fixture(scope="module")
def single() -> dict:
    return measure(HessianOperator(model(), F.cross_entropy, data()))


@pytest.mark.parametrize("what", ["eigenvalues", "trace", "density", "loss", "gradient"])
def test_data_parallel_measurement_equals_single_process(ranks, single, what: str) -> None:
    expected = torch.as_tensor(single[what], dtype=torch.float64)
    results = [torch.as_tensor(rank["measure"][what], dtype=torch.float64) for rank in ranks]
    for result in results:
        torch.testing.assert_close(result, expected, rtol=1e-9, atol=1e-12)
    assert torch.equal(results[0], results[1])  # identical on every rank


@pytest.mark.parametrize("what", ["ggn_matmat", "ggn_matvec", "fisher_matmat", "fisher_matvec"])
def test_data_parallel_gauss_newton_products_equal_single_process(ranks, what: str) -> None:
    expected = gauss_newton_products(data())[what]
    results = [rank["gauss_newton"][what] for rank in ranks]
    for result in results:
        torch.testing.assert_close(result, expected, rtol=1e-10, atol=1e-13)
    assert torch.equal(results[0], results[1])
