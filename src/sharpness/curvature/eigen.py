"""Extreme eigenvalues of a symmetric operator from matrix-vector products: Lanczos and power iteration.

- :func:`top_eigenvalues`: the ``k`` largest (or smallest) eigenpairs by block Lanczos with full
  reorthogonalisation, with Ritz residuals and a per-pair convergence flag that also certifies the pair's rank
  against missed copies of a repeated eigenvalue. The method of choice: far fewer products than power iteration
  when the spectral gap is small, and it yields ``k`` pairs at once; a block of ``b`` vectors sees up to ``b``
  copies of a repeated eigenvalue, which single-vector Lanczos (``b = 1``) cannot.
- :func:`power_iteration`: the dominant eigenvalue (largest in magnitude) with PyHessian's stopping rule, for
  comparison with the numbers in the literature.
- :func:`bulk_ratio`: ``λ_1 / λ_5``, the SAM paper's measure of how far the top eigenvalue sticks out of the bulk.

References: C. Lanczos, "An iteration method for the solution of the eigenvalue problem of linear differential
and integral operators", J. Res. Nat. Bur. Standards 45 (1950); G. H. Golub & C. F. Van Loan, *Matrix
Computations*, 4th ed., §10.1 (Lanczos) and §10.3 (reorthogonalisation, block Lanczos); G. H. Golub &
R. Underwood, "The block Lanczos method for computing eigenvalues", Mathematical Software III (1977);
B. N. Parlett, *The Symmetric Eigenvalue Problem* (1980/1998), §6.9 ("twice is enough"); B. Ghorbani,
S. Krishnan, Y. Xiao, "An investigation into neural net optimization via Hessian eigenvalue density", ICML 2019
(Lanczos on neural-network Hessians); Z. Yao et al., "PyHessian: Neural networks through the lens of the
Hessian", 2020 (power iteration, tol 1e-3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from sharpness._deprecation import renamed_arguments
from sharpness.checks import check_integer, check_real
from sharpness.curvature.linop import LinearOperator, apply_block, counting, default_generator, gaussian

__all__ = ["EigenResult", "PowerResult", "top_eigenvalues", "power_iteration", "bulk_ratio"]

#: The default block size of :func:`top_eigenvalues` is ``min(k, DEFAULT_MAX_BLOCK)``.
DEFAULT_MAX_BLOCK = 2


@dataclass(frozen=True)
class EigenResult:
    """Ritz approximations to ``k`` extreme eigenpairs (see :func:`top_eigenvalues`).

    Attributes:
        eigenvalues: ``(k,)``, largest first for ``which="largest"``, smallest first for ``which="smallest"``.
        eigenvectors: ``(k, n)``, unit-norm rows, ``eigenvectors[i]`` belongs to ``eigenvalues[i]``.
        residuals: ``(k,)``, ``r_i = ‖A y_i − θ_i y_i‖`` from the block Lanczos relation (``‖Σ Vᵀ s_i‖`` for the
            last block's remainder ``U Σ Vᵀ``; equal to the true residual up to rounding, because full
            reorthogonalisation keeps the relation intact). Some eigenvalue of ``A`` lies within ``r_i`` of ``θ_i``.
        error_bounds: ``(k,)``, ``min(r_i, r_i² / gap_i)``: ``r_i`` is a rigorous bound on the distance from ``θ_i``
            to the nearest eigenvalue; ``r_i² / gap_i`` is the Kato–Temple estimate, ``gap_i`` being the distance
            to the nearest other Ritz value (no estimate while there is only one).
        accurate: ``(k,)`` bool: the chosen criterion's measure (residual, or error bound) ``<= tol · |θ_i|``, or
            the residual at the rounding floor ``10 · eps · ‖T‖``. With the residual criterion: some eigenvalue
            lies within ``tol · |θ_i|`` of ``θ_i``; not necessarily the ``i``-th one.
        converged: ``(k,)`` bool: ``accurate`` *and* the rank of pair ``i`` is certified against missed copies of a
            repeated eigenvalue: no group of ``block_size`` or more Ritz values that may be copies of one eigenvalue
            (their intervals ``θ ± r`` overlap) comes before position ``i``. See :func:`top_eigenvalues`.
        num_matvecs: products with the operator used.
        iterations: the number of basis vectors, the order of the projected matrix ``T`` (= ``num_matvecs``).
        block_size: the block size ``b`` used.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    error_bounds: Tensor
    converged: Tensor
    num_matvecs: int
    iterations: int
    accurate: Tensor
    block_size: int


@dataclass(frozen=True)
class PowerResult:
    """The dominant eigenpair from :func:`power_iteration`.

    Attributes:
        eigenvalue: the last Rayleigh quotient ``vᵀ A v`` (the eigenvalue largest in magnitude, with its sign).
        eigenvector: the last iterate ``A v / ‖A v‖`` (unit norm; for a negative eigenvalue its sign alternates).
        num_matvecs: products with the operator used (one per iteration).
        converged: whether the relative-change criterion was met within ``num_matvecs`` iterations.
    """

    eigenvalue: float
    eigenvector: Tensor
    num_matvecs: int
    converged: bool


def _start_vector(init: Tensor | None, op: LinearOperator, generator: torch.Generator | None) -> Tensor:
    """A unit start vector: ``init`` normalised, or a Gaussian one drawn from ``generator``."""
    if init is None:
        v = gaussian(op.dim, dtype=op.dtype, device=op.device, generator=default_generator(generator))
    else:
        if not isinstance(init, Tensor):
            raise ValueError(f"init must be a tensor of shape ({op.dim},), got {type(init).__name__}")
        if init.numel() != op.dim:
            raise ValueError(f"init must have {op.dim} elements (the operator's dim), got shape {tuple(init.shape)}")
        v = init.detach().reshape(-1).to(device=op.device, dtype=op.dtype).clone()
        if not torch.isfinite(v).all():
            raise ValueError("init must be finite")
    norm = torch.linalg.vector_norm(v)
    if not norm > 0:
        raise ValueError("init must be a non-zero vector")
    return v / norm


def _start_block(init: Tensor | None, op: LinearOperator, block_size: int, generator: torch.Generator) -> Tensor:
    """``block_size`` orthonormal rows: the start vector (``init`` or Gaussian) first, then Gaussian ones."""
    first = _start_vector(init, op, generator)
    if block_size == 1:
        return first[None]
    rest = [gaussian(op.dim, dtype=op.dtype, device=op.device, generator=generator) for _ in range(block_size - 1)]
    q, _ = torch.linalg.qr(torch.stack([first, *rest], dim=1), mode="reduced")  # q[:, 0] = ±first
    return q.T


class _BlockLanczos:
    """Block Lanczos with full reorthogonalisation, kept in its explicit-projection (block Arnoldi) form.

    The orthonormal basis ``Q`` (rows ``basis[:size]``) grows by one block of ``w`` rows per :meth:`step`; the
    current block is ``Q_j = basis[start:size]``. A step forms ``W = A Q_jᵀ`` with one :func:`apply_block`,
    orthogonalises it against *all* of ``Q`` by classical Gram-Schmidt applied twice (CGS2, "twice is enough")
    and stores the coefficients ``H = Q W`` as block column ``j`` of the projected matrix ``T = Q A Qᵀ`` (and, ``A``
    being symmetric, as its block row). In exact arithmetic ``T`` is block tridiagonal (Golub & Van Loan §10.3);
    keeping every coefficient costs nothing here and keeps ``T`` exact across deflations and restarts.

    The remainder ``R = W − Qᵀ H`` (``n × w``) is kept as its SVD ``U Σ Vᵀ``. Since ``A Qᵀ = Qᵀ T + R E_jᵀ``, a
    Ritz vector ``y = Qᵀ s`` has residual ``‖A y − θ y‖ = ‖R s_j‖ = ‖Σ Vᵀ s_j‖`` (``s_j``: the entries of ``s``
    on the last block): :attr:`coupling` is ``Σ Vᵀ``. The next block is ``U``'s columns whose singular value
    exceeds the deflation threshold ``10 · sqrt(n) · eps · ‖T‖`` (a Gershgorin estimate of ``‖T‖``), the others
    being rounding noise (that part of the block Krylov space is invariant); each is replaced by a random unit
    vector orthogonal to the basis, so the block keeps its width. If every direction deflates (an invariant
    subspace: its Ritz values are exact eigenvalues) that is a restart. With ``w = 1`` this is single-vector
    Lanczos with full reorthogonalisation, ``T`` tridiagonal.
    """

    def __init__(self, op: LinearOperator, max_size: int, first: Tensor) -> None:
        self.op = op
        self.n = op.dim
        self.max_size = max_size
        self.eps = torch.finfo(op.dtype).eps
        self.basis = torch.empty(max_size, self.n, dtype=op.dtype, device=op.device)
        self.basis[: first.shape[0]] = first
        self.start, self.size = 0, first.shape[0]
        self.projection = torch.zeros(max_size, max_size, dtype=torch.float64)  # T, float64 on the CPU
        self.coupling = torch.zeros(0, 0, dtype=torch.float64)
        self.anorm = 0.0  # running Gershgorin bound on ‖T‖, the scale of the deflation threshold
        self._directions = first[:0]  # Uᵀ, rows
        self._singular = torch.zeros(0, dtype=torch.float64)

    @property
    def threshold(self) -> float:
        """Singular values of the remainder at or below this are rounding noise (after CGS2, ~ eps ‖A‖)."""
        return 10.0 * math.sqrt(self.n) * self.eps * self.anorm

    def _orthogonalise(self, rows: Tensor, count: int) -> tuple[Tensor, Tensor]:
        """Remove from ``rows`` their components along ``basis[:count]`` twice (CGS2); return them and the sum."""
        q = self.basis[:count]
        total = rows.new_zeros(count, rows.shape[0])
        for _ in range(2):
            h = q @ rows.T
            rows = rows - h.T @ q
            total += h
        return rows, total

    def step(self) -> bool:
        """Multiply the current block and extend ``T``; ``True`` if the basis now spans an invariant subspace."""
        block = self.basis[self.start : self.size]
        rows, coeffs = self._orthogonalise(apply_block(self.op, block.T.contiguous()).T, self.size)
        coeffs = coeffs.to(device="cpu", dtype=torch.float64)
        cols = slice(self.start, self.size)
        coeffs[cols] = (coeffs[cols] + coeffs[cols].T) / 2
        self.projection[: self.size, cols] = coeffs
        self.projection[cols, : self.size] = coeffs.T
        u, singular, vh = torch.linalg.svd(rows.T, full_matrices=False)
        self._singular = singular.to(device="cpu", dtype=torch.float64)
        self._directions = u.T
        self.coupling = self._singular[:, None] * vh.to(device="cpu", dtype=torch.float64)
        self.anorm = max(self.anorm, float(coeffs.abs().sum(dim=0).max() + self._singular.max()))
        return self.size >= self.n or bool((self._singular <= self.threshold).all())

    def can_advance(self) -> bool:
        """Whether the next block (the remainder's kept directions, at least one vector) fits in ``max_size``."""
        kept = int((self._singular > self.threshold).sum())
        return self.size < self.n and self.size + max(kept, 1) <= self.max_size

    def advance(self, generator: torch.Generator) -> None:
        """Make the next block current: the kept remainder directions, then random replacements (as many as fit)."""
        kept = self._directions[(self._singular > self.threshold).to(self._directions.device)]
        end = self.size + kept.shape[0]
        self.basis[self.size : end] = kept
        while end - self.size < self._directions.shape[0] and end < self.max_size:
            fresh = self._random_orthogonal(end, generator)
            if fresh is None:
                break
            self.basis[end] = fresh
            end += 1
        if end == self.size:
            raise RuntimeError(f"Lanczos: no direction left to explore after {self.size} basis vectors")
        self.start, self.size = self.size, end

    def _random_orthogonal(self, count: int, generator: torch.Generator) -> Tensor | None:
        """A random unit vector orthogonal to ``basis[:count]``, or ``None`` if none is left (rounding level)."""
        v = gaussian(self.n, dtype=self.basis.dtype, device=self.basis.device, generator=generator)
        v, _ = self._orthogonalise((v / torch.linalg.vector_norm(v))[None], count)
        norm = float(torch.linalg.vector_norm(v))
        if norm <= 10.0 * math.sqrt(self.n) * self.eps:
            return None
        return v[0] / norm

    def ritz(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues (ascending) and eigenvectors (columns) of ``T``, float64 on the CPU."""
        return torch.linalg.eigh(self.projection[: self.size, : self.size])

    def residuals(self, s: Tensor) -> Tensor:
        """``‖A y − θ y‖`` for the Ritz vectors ``y = Qᵀ s`` of the columns of ``s``."""
        return torch.linalg.vector_norm(self.coupling @ s[self.start : self.size], dim=0)

    def vectors(self, s: Tensor) -> Tensor:
        """The unit Ritz vectors ``Qᵀ s`` as rows, in the operator's dtype and on its device."""
        vectors = s.T.to(device=self.basis.device, dtype=self.basis.dtype) @ self.basis[: self.size]
        return vectors / torch.linalg.vector_norm(vectors, dim=1, keepdim=True)


class _Pairs(NamedTuple):
    """The wanted Ritz pairs of one Rayleigh–Ritz step (float64, CPU); see :class:`EigenResult`."""

    coefficients: Tensor
    values: Tensor
    residuals: Tensor
    error_bounds: Tensor
    accurate: Tensor
    converged: Tensor


def _multiplicity_certified(values: Tensor, radii: Tensor, block_size: int) -> Tensor:
    """``(k,)`` bool: position ``i`` is certified unless a group of ``>= block_size`` possible copies ends before it.

    ``values`` are in the wanted order; consecutive values whose intervals ``θ ± radius`` overlap may approximate
    one eigenvalue and form a group. A block of ``b`` random vectors sees ``min(b, multiplicity)`` copies of an
    eigenvalue, so a group of fewer than ``b`` is complete, while a group of ``b`` or more may lack copies that
    belong before every later position.
    """
    certified = torch.ones(len(values), dtype=torch.bool)
    start = 0
    for i in range(1, len(values)):
        if abs(float(values[i] - values[i - 1])) > float(radii[i] + radii[i - 1]):
            if i - start >= block_size:
                certified[i:] = False
                break
            start = i
    return certified


def _ritz_pairs(lanczos: _BlockLanczos, k: int, which: str, tol: float, criterion: str, block_size: int) -> _Pairs:
    """Rayleigh–Ritz on the current basis: the ``k`` wanted pairs, their residuals, bounds and flags."""
    theta, s = lanczos.ritz()
    idx = torch.arange(len(theta) - 1, len(theta) - 1 - k, -1) if which == "largest" else torch.arange(k)
    values = theta[idx]
    res = lanczos.residuals(s[:, idx])
    floor = 10.0 * lanczos.eps * float(theta.abs().max())
    distances = (theta[None, :] - values[:, None]).abs()
    distances[torch.arange(k), idx] = torch.inf  # a Ritz value's distance to itself does not count
    gaps = distances.min(dim=1).values  # inf while there is one Ritz value (no estimate), 0 for an exact copy
    kato_temple = torch.where(torch.isfinite(gaps) & (gaps > 0), res**2 / gaps, torch.inf)
    bounds = torch.minimum(res, kato_temple)
    measure = res if criterion == "residual" else bounds
    accurate = (measure <= tol * values.abs()) | (res <= floor)
    converged = accurate & _multiplicity_certified(values, res + floor, block_size)
    return _Pairs(s[:, idx], values, res, bounds, accurate, converged)


@renamed_arguments(max_iter="num_matvecs")
def top_eigenvalues(
    op: LinearOperator,
    k: int = 1,
    *,
    which: str = "largest",
    num_matvecs: int = 100,
    tol: float = 1e-6,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    check_every: int = 1,
    criterion: Literal["residual", "eigenvalue"] = "residual",
    block_size: int | None = None,
) -> EigenResult:
    """The ``k`` largest (or smallest) eigenpairs of a symmetric operator by block Lanczos, fully reorthogonalised.

    Method (Golub & Van Loan §10.3; Golub & Underwood 1977): from ``b = block_size`` orthonormal start vectors
    (``init`` first if given, the others Gaussian from ``generator``), build an orthonormal basis ``Q`` of the block
    Krylov space ``span{Q_0, A Q_0, …, A^{j-1} Q_0}``, one block product ``A Q_j`` per step (the operator's
    ``matmat`` when it has one, see :func:`~sharpness.curvature.linop.apply_block`). Each new block is
    reorthogonalised against *all* previous vectors by classical Gram-Schmidt applied twice ("twice is enough",
    Parlett §6.9), so no spurious copies of converged eigenvalues appear; the coefficients give the projected
    matrix ``T = Qᵀ A Q`` and its eigenpairs ``(θ_i, s_i)`` the Ritz pairs ``(θ_i, Q s_i)`` (Rayleigh–Ritz), with
    residual ``‖A y_i − θ_i y_i‖`` computed from the last block's remainder for free. Every ``check_every`` steps
    (once there are ``>= k`` Ritz values) the ``k`` wanted pairs are tested (``accurate``, below); Lanczos stops
    when all are, when the next block would exceed ``num_matvecs`` products, or when the space is exhausted (an
    invariant subspace, whose Ritz values are exact eigenvalues). Directions of a block that fall to rounding level
    (deflation) are replaced by random vectors orthogonal to the basis. With ``b = 1`` this is exactly
    single-vector Lanczos. Memory: ``min(num_matvecs, n) × n`` values of the operator's dtype.

    Repeated eigenvalues: a Krylov space started from ``b`` generic vectors contains ``min(b, m)`` independent
    eigenvectors of an eigenvalue of multiplicity ``m``, so block Lanczos finds up to ``b`` copies, while with
    ``b = 1`` the next distinct eigenvalue can stand in for a second copy (e.g. ``50, 20, 10`` instead of
    ``50, 20, 20`` for ``k = 3``) with a tiny residual. A ``b = k`` block always finds the top ``k``; the default
    ``b = min(k, 2)`` finds pairs. The price is products: for the top 5 at ``tol = 1e-4`` on the test spectra
    (``tests/curvature/test_eigen.py::test_block_size_trade_off``) ``b = 2`` takes 1.5× the products of ``b = 1``
    when the top eigenvalues are distinct (13 → 20), ``b = 3`` about 2×; for ``k = 1`` the default is ``b = 1``.

    What ``converged[i] = True`` guarantees (criterion ``"residual"``): (1) ``‖A y_i − θ_i y_i‖ <= tol · |θ_i|``
    (or at the rounding floor), so some eigenvalue of ``A`` lies within ``tol · |θ_i|`` of ``θ_i``; and (2) the
    rank ``i`` is certified against multiplicity: no group of ``b`` or more Ritz values whose intervals ``θ ± r``
    overlap (possible copies of one eigenvalue) comes before position ``i``. A group smaller than the block is
    complete, a group of ``b`` or more may be missing copies, so every later position is left unconverged (then
    rerun with a larger ``block_size``). With ``b = 1`` every value forms such a group, so for ``k > 1`` only
    ``converged[0]`` can be true; ``accurate`` holds (1) alone. Not guaranteed, as for every Krylov method: that
    no eigenvalue the start block has (almost) no component along, e.g. an ``init`` orthogonal to it, is missing.
    With a generic random start the extreme eigenvalues converge first, so in practice the list is the top ``k``.

    Args:
        op: a symmetric :class:`~sharpness.curvature.linop.LinearOperator` (``matvec``, optionally ``matmat``).
        k: how many eigenpairs, ``1 <= k <= op.dim``.
        which: ``"largest"`` (algebraically largest, e.g. ``λ_max`` of a Hessian) or ``"smallest"`` (most negative).
        num_matvecs: at most this many products (= basis vectors; a block step is ``block_size`` products), at
            least ``k`` rounded up to a multiple of ``block_size``; capped at ``op.dim``. Deprecated alias:
            ``max_iter``.
        tol: relative tolerance (``>= 0``; 0 runs to the rounding floor or ``num_matvecs``).
        init: start vector (any shape with ``op.dim`` elements, not necessarily normalised), e.g. the previous
            top eigenvector when tracking ``λ_max`` during training (warm start); the first vector of the block.
        generator: source of the random start vectors; default a fresh generator seeded 0 (the global RNG is never
            used).
        check_every: test convergence every this many block steps (the test costs an eigendecomposition of ``T``).
        criterion: ``"residual"`` (default): ``tol`` bounds the relative residual. ``"eigenvalue"``: ``tol``
            bounds the relative error bound ``min(r_i, r_i² / gap_i)`` (Kato–Temple: if no other eigenvalue lies
            within ``gap_i`` of ``θ_i``, then ``|λ − θ_i| <= r_i² / gap_i``; ``gap_i`` is estimated by the distance
            to the nearest other Ritz value, so this is an estimate, not a guarantee). For an extreme eigenvalue this
            stops much earlier than the residual test at the same accuracy.
        block_size: vectors per block, ``1 <= block_size <= k``; default ``min(k, 2)`` (:data:`DEFAULT_MAX_BLOCK`).

    Returns:
        :class:`EigenResult` in the operator's dtype and on its device.

    References: Lanczos (1950); Golub & Van Loan, *Matrix Computations*, §10.1 and §10.3; Golub & Underwood
    (1977); Ghorbani, Krishnan & Xiao (2019).
    """
    op = counting(op)
    n = op.dim
    k = check_integer(k, "k", low=1, high=n, what="at most n, the operator's dim")
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    block_size = min(k, DEFAULT_MAX_BLOCK) if block_size is None else block_size
    block_size = check_integer(block_size, "block_size", low=1, high=k, what="a block wider than k finds no more")
    need = -(-k // block_size) * block_size
    num_matvecs = check_integer(
        num_matvecs, "num_matvecs", low=need, what=f"k = {k} rounded up to a multiple of block_size"
    )
    tol = check_real(tol, "tol", low=0.0)
    check_every = check_integer(check_every, "check_every", low=1)
    if criterion not in ("residual", "eigenvalue"):
        raise ValueError(f"criterion must be 'residual' or 'eigenvalue', got {criterion!r}")
    generator = default_generator(generator)

    lanczos = _BlockLanczos(op, min(num_matvecs, n), _start_block(init, op, block_size, generator))
    steps = 0
    while True:
        invariant = lanczos.step()
        steps += 1
        last = (invariant and lanczos.size >= k) or not lanczos.can_advance()
        if lanczos.size >= k and (last or steps % check_every == 0):
            pairs = _ritz_pairs(lanczos, k, which, tol, criterion, block_size)
            if last or bool(pairs.accurate.all()):
                break
        if last:
            raise RuntimeError(f"Lanczos: no direction left to explore after {lanczos.size} steps, fewer than k = {k}")
        lanczos.advance(generator)

    def out(t: Tensor) -> Tensor:
        return t.to(device=op.device, dtype=op.dtype)

    return EigenResult(
        eigenvalues=out(pairs.values),
        eigenvectors=lanczos.vectors(pairs.coefficients),
        residuals=out(pairs.residuals),
        error_bounds=out(pairs.error_bounds),
        converged=pairs.converged.to(device=op.device),
        accurate=pairs.accurate.to(device=op.device),
        num_matvecs=op.num_matvecs,
        iterations=lanczos.size,
        block_size=block_size,
    )


@renamed_arguments(max_iter="num_matvecs")
def power_iteration(
    op: LinearOperator,
    *,
    num_matvecs: int = 100,
    tol: float = 1e-3,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> PowerResult:
    """The dominant eigenvalue (largest in *magnitude*, returned with its sign) by power iteration.

    Method: ``v ← A v / ‖A v‖`` from a unit start vector (``init``, else Gaussian from ``generator``), with the
    Rayleigh quotient ``λ = vᵀ A v`` as the estimate, stopping as PyHessian does when
    ``|λ_new − λ_old| / (|λ_old| + 1e-6) < tol``. That rule measures stagnation, not accuracy: the error after
    stopping can be much larger than ``tol`` when ``|λ_2 / λ_1|`` is close to 1, and power iteration converges
    only like ``|λ_2/λ_1|^{2t}``; prefer :func:`top_eigenvalues`. It also finds ``λ_max`` of a Hessian only when
    no negative eigenvalue is larger in magnitude.

    Args:
        op: a symmetric :class:`~sharpness.curvature.linop.LinearOperator`.
        num_matvecs: at most this many products (= iterations), ``>= 1``. Deprecated alias: ``max_iter``.
        tol: relative-change tolerance, ``>= 0`` (PyHessian's default 1e-3; 0 runs all ``num_matvecs``).
        init: start vector with ``op.dim`` elements.
        generator: source of the random start vector; default a fresh generator seeded 0.

    References: R. von Mises & H. Pollaczek-Geiringer (1929); Golub & Van Loan §8.2.1; Yao et al., PyHessian (2020).
    """
    op = counting(op)
    num_matvecs = check_integer(num_matvecs, "num_matvecs", low=1)
    tol = check_real(tol, "tol", low=0.0)
    v = _start_vector(init, op, default_generator(generator))
    lam_old: float | None = None
    lam = 0.0
    converged = False
    for _ in range(num_matvecs):
        w = op.matvec(v)
        lam = float(torch.dot(v, w))
        norm = torch.linalg.vector_norm(w)
        if not norm > 0:  # A v = 0: v is an eigenvector with eigenvalue 0 (dominant only for A = 0)
            converged = True
            break
        v = w / norm
        if lam_old is not None and abs(lam - lam_old) / (abs(lam_old) + 1e-6) < tol:
            converged = True
            break
        lam_old = lam
    return PowerResult(eigenvalue=lam, eigenvector=v, num_matvecs=op.num_matvecs, converged=converged)


def bulk_ratio(eigenvalues: Tensor | Sequence[float]) -> float:
    """``λ_1 / λ_5``: the largest eigenvalue over the fifth largest (the SAM paper's ``λ_max / λ_5``).

    ``eigenvalues`` is a 1-D tensor or sequence of at least 5 values in any order (they are sorted, largest
    first), e.g. ``top_eigenvalues(op, k=5).eigenvalues``. Returns ``±inf`` when ``λ_5 = 0`` (``nan`` if both are).

    Reference: Foret, Kleiner, Mobahi & Neyshabur, "Sharpness-aware minimization for efficiently improving
    generalization", ICLR 2021, §4.2.
    """
    values = torch.as_tensor(eigenvalues, dtype=torch.float64).detach().cpu()
    if values.ndim != 1 or values.numel() < 5:
        raise ValueError(f"eigenvalues must be 1-D with at least 5 values, got shape {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise ValueError("eigenvalues must be finite")
    top = torch.sort(values, descending=True).values
    l1, l5 = float(top[0]), float(top[4])
    if l5 == 0.0:
        return math.copysign(math.inf, l1) if l1 != 0.0 else math.nan
    return l1 / l5
