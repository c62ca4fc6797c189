"""Block products: ``apply_block`` and ``matmat`` on the operators, with their counts and shape checks."""

import pytest
import torch

from sharpness.curvature.linop import CallableOperator, CountingOperator, DenseOperator, apply_block, counting

F64 = torch.float64


def symmetric(n, seed=0):
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return a + a.T


class MatvecOnly:
    """An operator with ``matvec`` alone: ``apply_block`` must fall back to one product per column."""

    def __init__(self, matrix):
        self.matrix, self.dim, self.dtype, self.device = matrix, matrix.shape[0], matrix.dtype, matrix.device
        self.num_matvecs = 0

    def matvec(self, v):
        self.num_matvecs += 1
        return self.matrix @ v


def test_dense_matmat_is_one_matrix_product_counting_its_columns():
    a = symmetric(7)
    op = DenseOperator(a)
    v = torch.randn(7, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(op.matmat(v), a @ v, rtol=0, atol=0)
    assert op.num_matvecs == 3
    torch.testing.assert_close(apply_block(op, v), a @ v, rtol=0, atol=0)
    assert op.num_matvecs == 6


def test_apply_block_falls_back_to_matvec_column_by_column():
    a = symmetric(6)
    op = MatvecOnly(a)
    v = torch.randn(6, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    out = apply_block(op, v)
    assert op.num_matvecs == 4 and out.shape == (6, 4)
    torch.testing.assert_close(out, a @ v, rtol=1e-14, atol=1e-14)


def test_callable_operator_with_and_without_a_block_function():
    a = symmetric(5)
    blocks = []

    def block_fn(v):
        blocks.append(v.shape)
        return a @ v

    v = torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    with_block = CallableOperator(lambda x: a @ x, 5, dtype=F64, matmat=block_fn)
    torch.testing.assert_close(apply_block(with_block, v), a @ v)
    assert blocks == [(5, 2)] and with_block.num_matvecs == 2
    columns = CallableOperator(lambda x: a @ x, 5, dtype=F64)
    torch.testing.assert_close(apply_block(columns, v), a @ v)
    assert columns.num_matvecs == 2
    with pytest.raises(TypeError, match="matmat"):
        CallableOperator(lambda x: x, 5, matmat=3)


def test_counting_operator_counts_blocks_and_detaches():
    a = symmetric(4)
    scale = torch.ones((), dtype=F64, requires_grad=True)
    inner = CallableOperator(lambda x: scale * (a @ x), 4, dtype=F64, matmat=lambda v: scale * (a @ v))
    op = counting(inner)
    assert isinstance(op, CountingOperator)
    out = apply_block(op, torch.eye(4, dtype=F64)[:, :3])
    assert op.num_matvecs == 3 == inner.num_matvecs and not out.requires_grad
    op.matvec(torch.ones(4, dtype=F64))
    assert op.num_matvecs == 4


@pytest.mark.parametrize(
    "matmat, message",
    [(lambda v: v[:-1], "matmat"), (lambda v: v.sum(dim=1), "matmat"), (lambda v: 1.0, "matmat")],
)
def test_wrong_block_shapes_are_errors(matmat, message):
    op = counting(CallableOperator(lambda x: x, 4, dtype=F64, matmat=matmat))
    with pytest.raises(ValueError, match=message):
        apply_block(op, torch.ones(4, 2, dtype=F64))


@pytest.mark.parametrize(
    "op", [MatvecOnly(torch.ones(3, 4, dtype=F64)), CallableOperator(lambda x: x[:-1], 4, dtype=F64)]
)
def test_wrong_matvec_shape_in_the_column_fallback_names_matvec(op):
    op.dim = 4  # (3,) products for a dim-4 operator
    with pytest.raises(ValueError, match="matvec"):
        apply_block(counting(op), torch.ones(4, 2, dtype=F64))


@pytest.mark.parametrize("block", [torch.ones(4), torch.ones(3, 2), torch.ones(4, 0), "v"])
def test_apply_block_rejects_a_bad_block(block):
    with pytest.raises(ValueError, match="block"):
        apply_block(DenseOperator(torch.eye(4, dtype=F64)), block)


def test_a_non_callable_matmat_is_rejected():
    op = MatvecOnly(torch.eye(3, dtype=F64))
    op.matmat = "not a function"
    with pytest.raises(TypeError, match="matmat"):
        counting(op)


def test_apply_block_uses_columns_for_an_operator_that_prefers_them() -> None:
    """``prefers_blocks = False`` (the CPU double-backward Hessian): the same result from ``k`` matvecs."""
    a = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    calls = []
    op = CallableOperator(lambda x: a @ x, 4, dtype=F64, matmat=lambda v: calls.append(v) or a @ v)
    block = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    torch.testing.assert_close(apply_block(op, block), a @ block)
    assert len(calls) == 1
    op.prefers_blocks = False
    torch.testing.assert_close(apply_block(counting(op), block), a @ block)
    assert len(calls) == 1 and op.num_matvecs == 6


def test_the_cpu_double_backward_hessian_prefers_columns() -> None:
    from sharpness.curvature import HessianOperator

    model = torch.nn.Linear(3, 2).double()
    data = (torch.randn(5, 3, dtype=F64), torch.randint(0, 2, (5,)))
    loss = torch.nn.functional.cross_entropy
    assert not HessianOperator(model, loss, data).prefers_blocks
    assert HessianOperator(model, loss, data, backend="forward_over_reverse").prefers_blocks
