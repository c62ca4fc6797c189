"""Block products ``matmat(V)``: the operator applied to every column, one pass over the data, vectorised where
torch allows it and a column loop (with a warning) where it does not."""

from __future__ import annotations

import warnings

import pytest
import torch
from dense_curvature import batches, mlp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sharpness.curvature import EmpiricalFisherOperator, GGNOperator, HessianOperator

F = nn.functional


def _huber(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.huber_loss(outputs, targets, delta=0.5)  # not recognised: the GGN's generic output Hessian


def _loader(loss: str) -> DataLoader:
    (x, y), *_ = batches([16], loss, seed=4)
    return DataLoader(TensorDataset(x, y), batch_size=6)  # batches of 6, 6 and 4


FACTORIES = {
    "hessian-cached": lambda model, mode: HessianOperator(model, F.cross_entropy, batches((4, 7, 5)), mode=mode),
    "hessian-loader": lambda model, mode: HessianOperator(model, F.cross_entropy, _loader("cross_entropy"), mode=mode),
    "hessian-forward-over-reverse": lambda model, mode: HessianOperator(
        model, F.mse_loss, batches((4, 7), "mse_loss"), backend="forward_over_reverse", mode=mode
    ),
    "ggn-cross-entropy": lambda model, mode: GGNOperator(model, F.cross_entropy, batches((4, 7, 5)), mode=mode),
    "ggn-mse-loader": lambda model, mode: GGNOperator(model, nn.MSELoss(), _loader("mse_loss"), mode=mode),
    "ggn-generic": lambda model, mode: GGNOperator(model, _huber, batches((4, 7), "mse_loss"), mode=mode),
    "fisher-cross-entropy": lambda model, mode: EmpiricalFisherOperator(
        model, F.cross_entropy, batches((4, 7, 5)), mode=mode
    ),
    "fisher-mse-loader": lambda model, mode: EmpiricalFisherOperator(model, F.mse_loss, _loader("mse_loss"), mode=mode),
}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_matmat_equals_columnwise_matvec(name: str, mode: str) -> None:
    op = FACTORIES[name](mlp(batchnorm=True, dropout=True), mode)
    V = torch.randn(op.dim, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback: BatchNorm (train mode too) vectorises
        block = op.matmat(V)
    assert op.num_matvecs == 5 and block.shape == (op.dim, 5) and block.dtype == torch.float64
    columns = torch.stack([op.matvec(v) for v in V.T], dim=1)
    assert op.num_matvecs == 10
    torch.testing.assert_close(block, columns, rtol=0, atol=1e-12)
    torch.testing.assert_close(op.matmat(V[:, 2:3]), columns[:, 2:3], rtol=0, atol=1e-12)  # k = 1
    assert op.num_matvecs == 11


def test_bad_blocks() -> None:
    op = GGNOperator(mlp(), F.cross_entropy, batches([4]))
    for bad in (torch.ones(op.dim), torch.ones(op.dim + 1, 2), torch.ones(op.dim, 0), [[1.0]]):
        with pytest.raises(ValueError, match=rf"block of shape \({op.dim}, k\)"):
            op.matmat(bad)  # type: ignore[arg-type]
    assert op.num_matvecs == 0


# ------------------------------------------------------------------ the column loop where vmap cannot go


class _CubeGrad(torch.autograd.Function):
    """``(g, x) ↦ 3x²g``; its backward reads a Python float from the incoming gradient, which a batched
    (``is_grads_batched``) double backward cannot do."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, x)
        return 3 * x**2 * g

    @staticmethod
    def backward(ctx, gg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, x = ctx.saved_tensors
        one = float(gg.abs().sum() >= 0)
        return one * 3 * x**2 * gg, one * 6 * x * g * gg


class _Cube(torch.autograd.Function):
    """``x ↦ x³`` usable by torch.func's grad transforms (``setup_context``, ``jvp``) but without a vmap rule,
    like many custom kernels."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g

    @staticmethod
    def jvp(ctx, t: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x**2 * t


class _CubeItem(_Cube):
    """``_Cube`` whose backward is ``_CubeGrad``: double backward works, batched double backward does not."""

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return _CubeGrad.apply(g, x)


class _CubeLayer(nn.Module):
    def __init__(self, item_backward: bool) -> None:
        super().__init__()
        self.function = _CubeItem if item_backward else _Cube

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.function.apply(h)


@pytest.mark.parametrize(
    ("kind", "item_backward"),
    [("double_backward", True), ("forward_over_reverse", False), ("ggn", False), ("fisher", False)],
)
def test_matmat_falls_back_to_a_column_loop_where_vmap_fails(kind: str, item_backward: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), _CubeLayer(item_backward), nn.Linear(7, 3)).double()
    data = batches((4, 6))
    if kind in ("ggn", "fisher"):
        op = (GGNOperator if kind == "ggn" else EmpiricalFisherOperator)(model, F.cross_entropy, data)
    else:
        op = HessianOperator(model, F.cross_entropy, data, backend=kind)
    V = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    columns = torch.stack([op.matvec(v) for v in V.T], dim=1)
    with pytest.warns(RuntimeWarning, match="looping over the columns"):
        block = op.matmat(V)
    torch.testing.assert_close(block, columns, rtol=0, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # warned once; the operator remembers
        torch.testing.assert_close(op.matmat(V), columns, rtol=0, atol=1e-12)
    assert op.num_matvecs == 9
