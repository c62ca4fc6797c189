"""The measurement set of every operator: one batch, a list, a DataLoader; refused inputs; bounded memory."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from dense_curvature import batches, mlp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sharpness.curvature import EmpiricalFisherOperator, GGNOperator, HessianOperator
from sharpness.curvature.measurement_set import MAX_CACHED_BATCHES

F = nn.functional
OPERATORS = [HessianOperator, GGNOperator, EmpiricalFisherOperator]
X, Y = batches([16], seed=5)[0]


def _block(op) -> torch.Tensor:
    V = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return op.matmat(V)


@pytest.mark.parametrize("operator", OPERATORS)
def test_every_form_of_the_data_gives_the_operator_of_all_examples(operator) -> None:
    model = mlp()  # eval mode, no BatchNorm: the operator does not depend on how the examples are batched
    whole = operator(model, F.cross_entropy, (X, Y))
    expected, (loss, gradient) = _block(whole), whole.loss_and_gradient()
    forms = {
        "[x, y]": [X, Y],  # a two-element list of tensors is ONE batch
        "[(x, y)]": [(X, Y)],
        "unequal list": [(X[:3], Y[:3]), (X[3:10], Y[3:10]), (X[10:], Y[10:])],
        "tuple of batches": ((X[:8], Y[:8]), (X[8:], Y[8:])),
        "loader": DataLoader(TensorDataset(X, Y), batch_size=5),  # 5, 5, 5, 1; yields [x, y] lists
        "shuffled loader": DataLoader(TensorDataset(X, Y), batch_size=6, shuffle=True),
        "many batches": [(X[i : i + 1], Y[i : i + 1]) for i in range(16)],  # more than MAX_CACHED_BATCHES
    }
    for name, data in forms.items():
        op = operator(model, F.cross_entropy, data)
        torch.testing.assert_close(_block(op), expected, rtol=1e-10, atol=1e-13, msg=name)
        torch.testing.assert_close(_block(op), expected, rtol=1e-10, atol=1e-13, msg=name)  # re-iterated
        other_loss, other_gradient = op.loss_and_gradient()
        assert other_loss == pytest.approx(loss, rel=1e-12), name
        torch.testing.assert_close(other_gradient, gradient, rtol=1e-10, atol=1e-13, msg=name)


def _generator():
    yield X, Y


class _Growing:
    """A re-iterable that yields one more batch every time it is iterated."""

    def __init__(self) -> None:
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter([(X[:4], Y[:4])] * self.passes)


@pytest.mark.parametrize("operator", OPERATORS)
def test_data_that_cannot_be_measured_is_refused_with_a_fix(operator) -> None:
    model = mlp()
    refused_at_construction = [
        (_generator(), TypeError, "one-shot iterator.*pass a list of batches or a DataLoader"),
        (iter(DataLoader(TensorDataset(X, Y), batch_size=4)), TypeError, "one-shot iterator"),
        (X, TypeError, "single tensor"),
        (3, TypeError, "got int"),
        ([], ValueError, "empty"),
    ]
    for data, error, message in refused_at_construction:
        with pytest.raises(error, match=message):
            operator(model, F.cross_entropy, data)
    refused_at_the_first_product = [
        ([{"x": X, "y": Y}], TypeError, "batch 0 is a dict, not an"),
        (TensorDataset(X, Y), TypeError, "0-dim tensor.*DataLoader"),  # a dataset of single examples
        (DataLoader(TensorDataset(X[:0], Y[:0]), batch_size=4), ValueError, "empty"),
    ]
    for data, error, message in refused_at_the_first_product:
        op = operator(model, F.cross_entropy, data)
        with pytest.raises(error, match=message):
            op.matvec(torch.ones(op.dim, dtype=torch.float64))
    op = operator(model, F.cross_entropy, _Growing())
    op.matvec(torch.ones(op.dim, dtype=torch.float64))
    with pytest.raises(ValueError, match="yielded 8 examples on this pass but 4 on the first"):
        op.matvec(torch.ones(op.dim, dtype=torch.float64))


# ------------------------------------------------------------------ memory: no graph kept for unbounded data


class _LiveSavedTensors:
    """Counts the tensors autograd saves for backward that are still referenced by a graph (and their peak).

    The hooks box a detached alias (autograd restores the graph metadata on unpacking; the box must not reference
    the tensor's own ``grad_fn``, which would make a cycle through C++ that keeps the graph alive)."""

    def __init__(self) -> None:
        self.boxes: weakref.WeakSet = weakref.WeakSet()
        self.peak = 0

    def pack(self, tensor: torch.Tensor) -> _Box:
        box = _Box(tensor.detach())
        self.boxes.add(box)
        self.peak = max(self.peak, len(self.boxes))
        return box

    @staticmethod
    def unpack(box: _Box) -> torch.Tensor:
        return box.tensor

    def live(self) -> int:
        gc.collect()
        return len(self.boxes)


class _Box:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _measure_graphs(data, **kwargs) -> tuple[HessianOperator, _LiveSavedTensors]:
    """A matmat and a matvec under the counting hooks (their results checked against the hook-free ones)."""
    counter = _LiveSavedTensors()
    op = HessianOperator(mlp(), F.cross_entropy, data, **kwargs)
    V = torch.randn(op.dim, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        products = op.matmat(V), op.matvec(V[:, 0])
    expected = HessianOperator(mlp(), F.cross_entropy, data, **kwargs).matmat(V)
    torch.testing.assert_close(products[0], expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(products[1], expected[:, 0], rtol=1e-12, atol=1e-14)
    return op, counter


def test_hessian_caches_graphs_only_for_a_bounded_measurement_set() -> None:
    few = [(X[:4], Y[:4]), (X[4:8], Y[4:8]), (X[8:], Y[8:])]
    cached, counter = _measure_graphs(few)
    assert len(cached._graphs) == 3 and counter.live() > 0
    for data, kwargs in [
        (DataLoader(TensorDataset(X, Y), batch_size=4), {}),
        ([(X[i : i + 1], Y[i : i + 1]) for i in range(MAX_CACHED_BATCHES + 1)], {}),
        (few, {"cache_graph": False}),
    ]:
        op, counter = _measure_graphs(data, **kwargs)
        assert not op._graphs and counter.live() == 0  # nothing left alive after the products


def test_peak_memory_does_not_grow_with_the_number_of_batches() -> None:
    """The peak number of live saved tensors during a product is that of one batch's graph."""
    x, y = batches([32], seed=6)[0]
    peaks = []
    for num_batches in (2, 8):
        loader = DataLoader(TensorDataset(x[: 4 * num_batches], y[: 4 * num_batches]), batch_size=4)
        peaks.append(_measure_graphs(loader)[1].peak)
    assert peaks[0] == peaks[1] > 0
