"""Extreme eigenvalues of a symmetric operator from matrix-vector products: Lanczos and power iteration.

- :func:`top_eigenvalues`: the ``k`` largest (or smallest) eigenpairs by Lanczos with full
  reorthogonalisation, with Ritz residuals and a per-pair convergence flag. The method of choice: far fewer
  products than power iteration when the spectral gap is small, and it yields ``k`` pairs at once.
- :func:`power_iteration`: the dominant eigenvalue (largest in magnitude) with PyHessian's stopping rule, for
  comparison with the numbers in the literature.
- :func:`bulk_ratio`: ``λ_1 / λ_5``, the SAM paper's measure of how far the top eigenvalue sticks out of the bulk.

References: C. Lanczos, "An iteration method for the solution of the eigenvalue problem of linear differential
and integral operators", J. Res. Nat. Bur. Standards 45 (1950); G. H. Golub & C. F. Van Loan, *Matrix
Computations*, 4th ed., §10.1 (Lanczos) and §10.3 (reorthogonalisation); B. N. Parlett, *The Symmetric
Eigenvalue Problem* (1980/1998), §6.9 ("twice is enough"); B. Ghorbani, S. Krishnan, Y. Xiao, "An investigation
into neural net optimization via Hessian eigenvalue density", ICML 2019 (Lanczos on neural-network Hessians);
Z. Yao et al., "PyHessian: Neural networks through the lens of the Hessian", 2020 (power iteration, tol 1e-3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from sharpness.checks import check_integer, check_real
from sharpness.curvature.linop import LinearOperator, counting, default_generator, gaussian

__all__ = ["EigenResult", "PowerResult", "top_eigenvalues", "power_iteration", "bulk_ratio"]


@dataclass(frozen=True)
class EigenResult:
    """Ritz approximations to ``k`` extreme eigenpairs (see :func:`top_eigenvalues`).

    Attributes:
        eigenvalues: ``(k,)``, largest first for ``which="largest"``, smallest first for ``which="smallest"``.
        eigenvectors: ``(k, n)``, unit-norm rows, ``eigenvectors[i]`` belongs to ``eigenvalues[i]``.
        residuals: ``(k,)``, the Lanczos estimate ``|β_m s_{m,i}|`` of ``‖A y_i − θ_i y_i‖`` (equal to it up to
            rounding, because full reorthogonalisation keeps the Lanczos relation intact).
        error_bounds: ``(k,)``, the estimated eigenvalue errors ``residual² / gap`` (gap: distance to the nearest
            other Ritz value; ``inf`` before there are two).
        converged: ``(k,)`` bool: the chosen criterion's measure (residual, or error bound) ``<= tol · |θ_i|``,
            or the residual at the rounding floor ``10 · eps · ‖T‖``.
        num_matvecs: products with the operator used.
        iterations: Lanczos steps taken (the size of the tridiagonal matrix ``T``).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    error_bounds: Tensor
    converged: Tensor
    num_matvecs: int
    iterations: int


@dataclass(frozen=True)
class PowerResult:
    """The dominant eigenpair from :func:`power_iteration`.

    Attributes:
        eigenvalue: the last Rayleigh quotient ``vᵀ A v`` (the eigenvalue largest in magnitude, with its sign).
        eigenvector: the last iterate ``A v / ‖A v‖`` (unit norm; for a negative eigenvalue its sign alternates).
        num_matvecs: products with the operator used (one per iteration).
        converged: whether the relative-change criterion was met within ``max_iter`` iterations.
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


class _Lanczos:
    """Symmetric Lanczos with full reorthogonalisation by classical Gram-Schmidt applied twice (CGS2).

    Stores the basis ``Q`` (rows ``q_0 … q_m``), the diagonal ``alpha`` and off-diagonal ``beta`` of ``T``. After
    ``m`` steps ``A Q_mᵀ = Q_mᵀ T_m + β_m q_m e_mᵀ`` holds to rounding, so a Ritz pair ``(θ, Q_mᵀ s)`` has residual
    ``|β_m s_m|``. Breakdown (``β`` at rounding level: an invariant subspace) is reported to the caller, who may
    :meth:`restart` with a random vector orthogonal to the basis; ``T`` is then block diagonal.
    """

    def __init__(self, op, max_steps: int, q0: Tensor) -> None:
        self.op = op
        self.n = op.dim
        self.max_steps = max_steps
        self.basis = torch.empty(max_steps, self.n, dtype=op.dtype, device=op.device)
        self.basis[0] = q0
        self.num_vectors = 1  # rows of `basis` in use
        self.alpha: list[float] = []
        self.beta: list[float] = []  # beta[j] couples q_j and q_{j+1}; 0 at a restart
        self.last_beta = 0.0  # the β computed by the last step, kept even when it counts as breakdown
        self.anorm = 0.0  # running Gershgorin bound on ‖T‖, the scale for the breakdown test
        self.eps = torch.finfo(op.dtype).eps

    @property
    def steps(self) -> int:
        return len(self.alpha)

    def _orthogonalise(self, w: Tensor, rows: int) -> tuple[Tensor, Tensor]:
        """Remove from ``w`` its components along ``basis[:rows]``, twice ("twice is enough"); return the sum."""
        q = self.basis[:rows]
        total = torch.zeros(rows, dtype=w.dtype, device=w.device)
        for _ in range(2):
            h = q @ w
            w = w - q.T @ h
            total += h
        return w, total

    def step(self) -> bool:
        """One Lanczos step; returns ``True`` on breakdown (the Krylov space is invariant to rounding)."""
        j = self.steps
        q = self.basis[j]
        w = self.op.matvec(q)
        alpha = torch.dot(q, w)
        w = w - alpha * q
        prev_beta = self.beta[j - 1] if j > 0 else 0.0
        if prev_beta != 0.0:
            w = w - prev_beta * self.basis[j - 1]
        w, h = self._orthogonalise(w, j + 1)
        alpha_f = float(alpha + h[j])
        beta = float(torch.linalg.vector_norm(w))
        self.alpha.append(alpha_f)
        self.last_beta = beta
        self.anorm = max(self.anorm, abs(alpha_f) + beta + prev_beta)
        # After CGS2 what is left of a vector inside span(Q) is rounding noise of size ~ eps ‖A‖ (times a small
        # factor from the product itself); treat anything below a generous multiple of that as zero.
        if beta <= 10.0 * math.sqrt(self.n) * self.eps * self.anorm or j + 1 >= self.n:
            self.beta.append(0.0)
            return True
        self.beta.append(beta)
        if j + 1 < self.max_steps:
            self.basis[j + 1] = w / beta
            self.num_vectors = j + 2
        return False

    def restart(self, generator: torch.Generator) -> bool:
        """Continue from a random unit vector orthogonal to the basis; ``False`` if none is left (dim reached)."""
        m = self.steps
        if m >= self.n or m >= self.max_steps:
            return False
        v = gaussian(self.n, dtype=self.basis.dtype, device=self.basis.device, generator=generator)
        v = v / torch.linalg.vector_norm(v)
        v, _ = self._orthogonalise(v, m)
        norm = float(torch.linalg.vector_norm(v))
        if norm <= 10.0 * math.sqrt(self.n) * self.eps:
            return False
        self.basis[m] = v / norm
        self.num_vectors = m + 1
        self.last_beta = 0.0
        return True

    def tridiagonal(self) -> Tensor:
        """``T_m`` as a dense float64 CPU matrix."""
        m = self.steps
        t = torch.diag(torch.tensor(self.alpha, dtype=torch.float64))
        if m > 1:
            off = torch.tensor(self.beta[: m - 1], dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        return t

    def ritz(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues (ascending) and eigenvectors (columns) of ``T_m``, float64 on the CPU."""
        return torch.linalg.eigh(self.tridiagonal())


def top_eigenvalues(
    op: LinearOperator,
    k: int = 1,
    *,
    which: str = "largest",
    max_iter: int = 100,
    tol: float = 1e-6,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    check_every: int = 1,
    criterion: Literal["residual", "eigenvalue"] = "residual",
) -> EigenResult:
    """The ``k`` largest (or smallest) eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

    Method: from a unit start vector ``q_0`` (``init``, else Gaussian from ``generator``), build an orthonormal
    basis of the Krylov space ``span{q_0, A q_0, …, A^{m-1} q_0}`` by the three-term recurrence, each new vector
    reorthogonalised against *all* previous ones by classical Gram-Schmidt applied twice ("twice is enough",
    Parlett §6.9), so no spurious copies of converged eigenvalues appear. The eigenpairs ``(θ_i, s_i)`` of the
    ``m × m`` tridiagonal ``T_m`` give Ritz pairs ``(θ_i, Q_m s_i)`` with residual ``‖A y_i − θ_i y_i‖ =
    |β_m s_{m,i}|`` (computed for free). Every ``check_every`` steps (once ``m >= k``) the ``k`` wanted Ritz pairs
    are tested: pair ``i`` has converged when ``|β_m s_{m,i}| <= max(tol · |θ_i|, 10 · eps · ‖T_m‖)`` (the second
    term is the rounding floor, which also covers ``θ_i ≈ 0``). Lanczos stops when all ``k`` have converged, when
    ``max_iter`` steps are done, or when the Krylov space is exhausted (``β`` at rounding level: an invariant
    subspace, whose Ritz values are exact eigenvalues). If that happens with fewer than ``k`` Ritz values it
    continues from a random vector orthogonal to the basis. No restarting otherwise: memory is
    ``min(max_iter, n) × n`` values of the operator's dtype.

    Caveats, inherent to single-vector Krylov methods: Lanczos sees only eigen-directions present in the start
    vector, so an ``init`` that is exactly an eigenvector (or lies in a small invariant subspace) returns that
    subspace's eigenvalues; and a repeated eigenvalue is found once per Krylov space, so with ``k > 1`` the next
    distinct eigenvalue may stand in for its second copy. Neither matters for a generic random start, nor for a
    warm start from a previous iterate (which is not an exact eigenvector of the new operator).

    Args:
        op: a symmetric :class:`~sharpness.curvature.linop.LinearOperator` (only ``matvec`` is called).
        k: how many eigenpairs, ``1 <= k <= op.dim``.
        which: ``"largest"`` (algebraically largest, e.g. ``λ_max`` of a Hessian) or ``"smallest"`` (most negative).
        max_iter: at most this many Lanczos steps (= products), ``>= k``; capped at ``op.dim``.
        tol: relative residual tolerance (``>= 0``; 0 runs to the rounding floor or ``max_iter``).
        init: start vector (any shape with ``op.dim`` elements, not necessarily normalised), e.g. the previous
            top eigenvector when tracking ``λ_max`` during training (warm start).
        generator: source of the random start vector; default a fresh generator seeded 0 (the global RNG is never
            used).
        check_every: test convergence every this many steps (the test costs an ``m × m`` eigendecomposition).
        criterion: ``"residual"`` (default): ``tol`` bounds the relative residual. ``"eigenvalue"``: ``tol``
            bounds the estimated relative eigenvalue error ``r_i² / gap_i`` (Kato–Temple: if no other eigenvalue
            lies within ``gap_i`` of ``θ_i``, then ``|λ − θ_i| ≤ r_i² / gap_i``; ``gap_i`` is estimated by the
            distance to the nearest other Ritz value, so this is an estimate, not a guarantee). For an extreme
            eigenvalue this stops much earlier than the residual test at the same accuracy.

    Returns:
        :class:`EigenResult` in the operator's dtype and on its device.

    References: Lanczos (1950); Golub & Van Loan, *Matrix Computations*, §10.1; Ghorbani, Krishnan & Xiao (2019).
    """
    op = counting(op)
    n = op.dim
    k = check_integer(k, "k", low=1, high=n, what="at most n, the operator's dim")
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    max_iter = check_integer(max_iter, "max_iter", low=k, what=f"at least k = {k}")
    tol = check_real(tol, "tol", low=0.0)
    check_every = check_integer(check_every, "check_every", low=1)
    if criterion not in ("residual", "eigenvalue"):
        raise ValueError(f"criterion must be 'residual' or 'eigenvalue', got {criterion!r}")
    generator = default_generator(generator)

    max_steps = min(max_iter, n)
    lanczos = _Lanczos(op, max_steps, _start_vector(init, op, generator))
    eps = torch.finfo(op.dtype).eps

    def wanted(theta: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        idx = torch.arange(len(theta) - 1, len(theta) - 1 - k, -1) if which == "largest" else torch.arange(k)
        vals = theta[idx]
        res = (lanczos.last_beta * s[-1, idx]).abs()
        floor = 10.0 * eps * float(theta.abs().max())
        distances = (theta[None, :] - vals[:, None]).abs()
        distances[torch.arange(k), idx] = torch.inf  # a Ritz value's distance to itself does not count
        gaps = distances.min(dim=1).values  # inf while m = 1: no estimate yet
        bounds = torch.where(torch.isfinite(gaps), res**2 / gaps, torch.full_like(res, torch.inf))
        measure = res if criterion == "residual" else bounds
        conv = (measure <= tol * vals.abs()) | (res <= floor)
        return idx, vals, res, conv, bounds

    theta = s = None
    while True:
        breakdown = lanczos.step()
        m = lanczos.steps
        if breakdown and m < k:
            if lanczos.restart(generator):
                continue
            raise RuntimeError(f"Lanczos: no direction left to explore after {m} steps, fewer than k = {k}")
        last = breakdown or m >= max_steps
        if m >= k and (last or m % check_every == 0):
            theta, s = lanczos.ritz()
            _, _, _, conv, _ = wanted(theta, s)
            if last or bool(conv.all()):
                break

    idx, vals, res, conv, bounds = wanted(theta, s)
    coeffs = s[:, idx].to(device=op.device, dtype=op.dtype)  # (m, k)
    vectors = coeffs.T @ lanczos.basis[:m]  # (k, n)
    vectors = vectors / torch.linalg.vector_norm(vectors, dim=1, keepdim=True)
    return EigenResult(
        eigenvalues=vals.to(device=op.device, dtype=op.dtype),
        eigenvectors=vectors,
        residuals=res.to(device=op.device, dtype=op.dtype),
        error_bounds=bounds.to(device=op.device, dtype=op.dtype),
        converged=conv.to(device=op.device),
        num_matvecs=op.num_matvecs,
        iterations=m,
    )


def power_iteration(
    op: LinearOperator,
    *,
    max_iter: int = 100,
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
        max_iter: at most this many iterations (= products), ``>= 1``.
        tol: relative-change tolerance, ``>= 0`` (PyHessian's default 1e-3; 0 runs all ``max_iter``).
        init: start vector with ``op.dim`` elements.
        generator: source of the random start vector; default a fresh generator seeded 0.

    References: R. von Mises & H. Pollaczek-Geiringer (1929); Golub & Van Loan §8.2.1; Yao et al., PyHessian (2020).
    """
    op = counting(op)
    max_iter = check_integer(max_iter, "max_iter", low=1)
    tol = check_real(tol, "tol", low=0.0)
    v = _start_vector(init, op, default_generator(generator))
    lam_old: float | None = None
    lam = 0.0
    converged = False
    for _ in range(max_iter):
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
