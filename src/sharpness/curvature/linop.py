"""Matrix-free symmetric linear operators, and the helpers the curvature estimators share.

An operator is anything with ``dim``, ``dtype``, ``device`` and ``matvec(v) -> A v`` on flat ``(dim,)`` tensors
(:class:`LinearOperator`, a structural protocol: no base class needed). It *may* also have ``matmat(V) -> A V``
on a ``(dim, k)`` block of column vectors, counting ``k`` products: a Hessian operator can then apply ``A`` to
several vectors in one batched pass. :func:`apply_block` is how the estimators multiply a block: ``op.matmat``
when the operator has it, else ``op.matvec`` column by column (the same products, the same count).

The estimators in :mod:`sharpness.curvature.eigen`, :mod:`sharpness.curvature.trace` and
:mod:`sharpness.curvature.density` only ever call ``matvec`` and ``matmat``; each wraps the operator in
:func:`counting` and reports how many products it used (``num_matvecs`` on its result; a block of ``k`` columns
counts ``k``), because for a Hessian every product costs a forward and two backward passes.

:class:`DenseOperator` wraps an explicit symmetric matrix (tests, docs, small problems) and counts its own
products; :class:`CallableOperator` turns a plain function (and optionally a block function) into an operator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from sharpness.checks import check_integer

__all__ = [
    "LinearOperator",
    "DenseOperator",
    "CallableOperator",
    "CountingOperator",
    "apply_block",
    "counting",
    "check_operator",
    "default_generator",
    "rademacher",
    "gaussian",
]


@runtime_checkable
class LinearOperator(Protocol):
    """A symmetric linear map on flat vectors of size ``dim``, known only through its products.

    ``matvec(v)`` takes a flat ``(dim,)`` tensor of ``dtype`` on ``device`` and returns ``A v`` with the same
    shape, dtype and device. The estimators assume ``A`` is symmetric (a Hessian). An operator may also define
    ``matmat(V)``: ``A V`` for a ``(dim, k)`` tensor, returning ``(dim, k)`` and counting ``k`` products; it is
    optional (not part of this protocol's checks) and reached through :func:`apply_block`.
    """

    dim: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, v: Tensor) -> Tensor: ...


class DenseOperator:
    """An explicit symmetric ``(n, n)`` matrix as a :class:`LinearOperator`; counts its products.

    Args:
        matrix: a square floating-point tensor; it is used as is (not copied), in its own dtype and device.
        check_symmetric: raise ``ValueError`` unless ``matrix`` is symmetric up to rounding
            (``|A - Aᵀ| <= 1e3 · eps · max|A|`` entrywise).

    ``num_matvecs`` counts every product since construction (set it to 0 to restart the count): one per
    :meth:`matvec`, ``k`` per :meth:`matmat` of ``k`` columns (one matrix product).
    """

    def __init__(self, matrix: Tensor, *, check_symmetric: bool = True) -> None:
        if not isinstance(matrix, Tensor):
            raise TypeError(f"matrix must be a torch.Tensor, got {type(matrix).__name__}")
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
            raise ValueError(f"matrix must be a non-empty square 2-D tensor, got shape {tuple(matrix.shape)}")
        if not matrix.is_floating_point():
            raise ValueError(f"matrix must have a floating-point dtype, got {matrix.dtype}")
        if check_symmetric:
            scale = matrix.abs().max().item()
            asym = (matrix - matrix.T).abs().max().item()
            if asym > 1e3 * torch.finfo(matrix.dtype).eps * max(scale, torch.finfo(matrix.dtype).tiny):
                raise ValueError(f"matrix must be symmetric; max |A - A^T| = {asym:.3g} (max |A| = {scale:.3g})")
        self.matrix = matrix
        self.dim = int(matrix.shape[0])
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.num_matvecs = 0

    def matvec(self, v: Tensor) -> Tensor:
        self.num_matvecs += 1
        return self.matrix @ v

    def matmat(self, block: Tensor) -> Tensor:
        self.num_matvecs += block.shape[1]
        return self.matrix @ block

    def __repr__(self) -> str:
        return f"DenseOperator(dim={self.dim}, dtype={self.dtype}, device={self.device})"


class CallableOperator:
    """A :class:`LinearOperator` from a function ``v -> A v`` on flat ``(dim,)`` tensors; counts its products.

    ``matmat``, if given, is a function ``V -> A V`` on ``(dim, k)`` blocks (e.g. a batched Hessian-vector
    product); without it :meth:`matmat` applies ``matvec`` to the columns one by one. Either way a block of ``k``
    columns counts ``k`` products.
    """

    def __init__(
        self,
        matvec: Callable[[Tensor], Tensor],
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        matmat: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if not callable(matvec):
            raise TypeError("matvec must be callable")
        if matmat is not None and not callable(matmat):
            raise TypeError("matmat must be callable or None")
        self._fn = matvec
        self._block_fn = matmat
        self.dim = check_integer(dim, "dim", low=1)
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_matvecs = 0

    def matvec(self, v: Tensor) -> Tensor:
        self.num_matvecs += 1
        return self._fn(v)

    def matmat(self, block: Tensor) -> Tensor:
        self.num_matvecs += block.shape[1]
        if self._block_fn is not None:
            return self._block_fn(block)
        return _stack_columns(self._fn, block)

    def __repr__(self) -> str:
        return f"CallableOperator(dim={self.dim}, dtype={self.dtype}, device={self.device})"


class CountingOperator:
    """Wraps an operator: forwards ``matvec`` and ``matmat``, counts the products, checks the outputs' shapes.

    ``num_matvecs`` grows by one per :meth:`matvec` and by ``k`` per :meth:`matmat` of ``k`` columns, which goes
    to the wrapped operator's own ``matmat`` when it has one (see :func:`apply_block`).

    The product is returned detached from any autograd graph (a Hessian-vector product built with
    ``create_graph`` would otherwise keep every graph alive). The wrapped operator's own counter (if it has one)
    keeps counting too.
    """

    def __init__(self, op: LinearOperator) -> None:
        check_operator(op)
        self.op = op
        self.dim = int(op.dim)
        self.dtype = op.dtype
        self.device = torch.device(op.device)
        self.num_matvecs = 0

    def matvec(self, v: Tensor) -> Tensor:
        out = self.op.matvec(v)
        self.num_matvecs += 1
        if not isinstance(out, Tensor) or out.shape != (self.dim,):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"operator's matvec must return a flat ({self.dim},) tensor, got {shape}")
        return out.detach()

    def matmat(self, block: Tensor) -> Tensor:
        out = apply_block(self.op, block)
        self.num_matvecs += block.shape[1]
        if not isinstance(out, Tensor) or out.shape != block.shape:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"operator's matmat must return a {tuple(block.shape)} tensor, got {shape}")
        return out.detach()

    def __repr__(self) -> str:
        return f"CountingOperator({self.op!r}, num_matvecs={self.num_matvecs})"


def _stack_columns(matvec: Callable[[Tensor], Tensor], block: Tensor) -> Tensor:
    """``[matvec(V[:, 0]), …, matvec(V[:, k-1])]`` as the columns of a ``(dim, k)`` tensor."""
    columns = [matvec(block[:, i].contiguous()) for i in range(block.shape[1])]
    for out in columns:
        if not isinstance(out, Tensor) or out.shape != block.shape[:1]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"operator's matvec must return a flat ({block.shape[0]},) tensor, got {shape}")
    return torch.stack(columns, dim=1)


def apply_block(op: LinearOperator, block: Tensor) -> Tensor:
    """``A V`` for a ``(dim, k)`` block ``V``: one ``op.matmat(V)`` if the operator has it (and does not declare
    ``prefers_blocks = False``: block products that are slower there than column by column), else ``k`` ``matvec`` s.

    Either way the operator counts ``k`` products and the result is the same up to rounding. Raises ``ValueError``
    unless ``block`` is a ``(dim, k)`` tensor with ``k >= 1``.
    """
    if not isinstance(block, Tensor) or block.ndim != 2 or block.shape[0] != op.dim or block.shape[1] == 0:
        shape = tuple(block.shape) if isinstance(block, Tensor) else type(block).__name__
        raise ValueError(f"block must be a ({op.dim}, k) tensor with k >= 1 columns, got shape {shape}")
    matmat = getattr(op, "matmat", None)
    if matmat is not None and getattr(op, "prefers_blocks", True):
        return matmat(block)
    return _stack_columns(op.matvec, block)


def counting(op: LinearOperator) -> CountingOperator:
    """Return ``op`` wrapped in a fresh :class:`CountingOperator` (its ``num_matvecs`` starts at 0)."""
    return CountingOperator(op)


def check_operator(op: object) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``op`` looks like a :class:`LinearOperator`."""
    for name in ("dim", "dtype", "device", "matvec"):
        if not hasattr(op, name):
            raise TypeError(f"op must be a LinearOperator (dim, dtype, device, matvec); it has no {name!r}")
    if not callable(op.matvec):
        raise TypeError("op.matvec must be callable")
    if hasattr(op, "matmat") and not callable(op.matmat):
        raise TypeError("op.matmat must be callable when present (an optional block product)")
    check_integer(op.dim, "op.dim", low=1)
    if not isinstance(op.dtype, torch.dtype) or not op.dtype.is_floating_point:
        raise ValueError(f"op.dtype must be a floating-point torch.dtype, got {op.dtype!r}")


def default_generator(generator: torch.Generator | None) -> torch.Generator:
    """``generator`` itself, or a fresh CPU generator seeded 0 when it is ``None`` (never the global RNG)."""
    if generator is None:
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def rademacher(n: int, *, dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> Tensor:
    """A flat ``(n,)`` vector of independent ±1, drawn on the generator's device and moved to ``device``."""
    bits = torch.randint(0, 2, (n,), generator=generator, device=generator.device)
    return bits.to(device=device, dtype=dtype).mul_(2).sub_(1)


def gaussian(n: int, *, dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> Tensor:
    """A flat ``(n,)`` standard normal vector, drawn on the generator's device and moved to ``device``."""
    return torch.randn(n, generator=generator, device=generator.device, dtype=dtype).to(device)
