"""The spectral density (eigenvalue histogram) of a symmetric operator by stochastic Lanczos quadrature (SLQ).

The spectral density of ``A`` (``n × n``, eigenvalues ``λ_j``) is ``φ(x) = (1/n) Σ_j δ(x − λ_j)``. For a random
unit vector ``v`` with ``E[v vᵀ] = I/n``, ``vᵀ f(A) v = Σ_j (vᵀu_j)² f(λ_j)`` has expectation ``∫ f φ``, and ``m``
steps of Lanczos from ``v`` give the ``m``-node Gauss quadrature rule for that sum: nodes ``θ_i`` = eigenvalues of
the tridiagonal ``T``, weights ``w_i`` = squared first components of its eigenvectors (``Σ_i w_i = 1``), exact for
polynomials of degree ``< 2m``. Averaging over vectors and smoothing each node with a Gaussian of width ``σ``
gives :func:`spectral_density`; :meth:`SpectralDensity.trace` gives ``tr(f(A)) ≈ n · mean_v Σ_i w_i f(θ_i)``.

References: L. Lin, Y. Saad & C. Yang, "Approximating spectral densities of large matrices", SIAM Review 58
(2016); G. H. Golub & G. Meurant, *Matrices, Moments and Quadrature with Applications* (2010); S. Ubaru, J. Chen
& Y. Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature", SIMAX 38 (2017); B. Ghorbani,
S. Krishnan & Y. Xiao, "An investigation into neural net optimization via Hessian eigenvalue density", ICML 2019.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sharpness._deprecation import renamed_arguments
from sharpness.checks import check_integer, check_real
from sharpness.curvature.linop import LinearOperator, apply_block, counting, default_generator, rademacher

__all__ = ["SpectralDensity", "spectral_density", "gaussian_density"]

#: The default grid extends this many σ beyond the extreme nodes (the Gaussian mass left outside is < 3e-7).
GRID_MARGIN_SIGMAS = 5.0
#: The default σ as a fraction of the node range ``max θ − min θ``.
DEFAULT_SIGMA_FRACTION = 0.01


@dataclass(frozen=True)
class SpectralDensity:
    """A smoothed spectral density and the quadrature rules behind it (see :func:`spectral_density`).

    Attributes:
        grid: ``(g,)`` increasing points ``x``.
        density: ``(g,)`` ``φ_σ(x)``, non-negative, integrating to 1 over the real line (over the default grid
            to within about 1e-6).
        nodes: ``(num_probes, m)`` Gauss quadrature nodes (Ritz values), ascending per row.
        weights: ``(num_probes, m)`` quadrature weights, each row summing to 1. A row whose Lanczos run ended early
            on an invariant subspace (the quadrature is then exact) is padded with zero weights at its last node.
        sigma: the Gaussian width used.
        dim: the operator's size ``n``.
        num_matvecs: products with the operator used.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    dim: int
    num_matvecs: int

    def trace(self, f: Callable[[Tensor], Tensor]) -> float:
        """The SLQ estimate of ``tr(f(A)) ≈ n · mean_v Σ_i w_i f(θ_i)`` (e.g. ``f = torch.exp``, ``lambda x: x**2``).

        ``f`` is applied elementwise to the nodes tensor. Unbiased up to the quadrature error, which vanishes for
        polynomials of degree ``< 2m``.
        """
        values = f(self.nodes.to(torch.float64))
        return float(self.dim * (self.weights.to(torch.float64) * values).sum(dim=1).mean())

    def mass_in(self, low: float, high: float) -> float:
        """The quadrature mass of nodes in ``[low, high]`` (the fraction of eigenvalues there, estimated)."""
        inside = (self.nodes >= low) & (self.nodes <= high)
        return float((self.weights * inside).sum(dim=1).mean())


def gaussian_density(grid: Tensor, nodes: Tensor, weights: Tensor, sigma: float) -> Tensor:
    """``mean_v Σ_i w_{v,i} N(x; θ_{v,i}, σ²)`` on ``grid`` for nodes/weights of shape ``(num_probes, m)``."""
    theta = nodes.reshape(-1)
    w = weights.reshape(-1) / nodes.shape[0]
    out = torch.zeros_like(grid)
    scale = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    chunk = max(1, 2**22 // max(1, theta.numel()))  # bound the temporary (chunk × nodes) block
    for start in range(0, grid.numel(), chunk):
        x = grid[start : start + chunk]
        z = (x[:, None] - theta[None, :]) / sigma
        out[start : start + chunk] = torch.exp(-0.5 * z * z) @ w * scale
    return out


def _lockstep_lanczos(op: LinearOperator, starts: Tensor, steps: int) -> list[Tensor]:
    """Independent Lanczos recurrences from the rows of ``starts`` (unit vectors), one block product per step.

    Probe ``p`` runs the single-vector recurrence ``β_j q_{j+1} = A q_j − α_j q_j − β_{j-1} q_{j-1}`` with full
    reorthogonalisation against its own basis by classical Gram-Schmidt applied twice, exactly as it would alone
    (Golub & Van Loan §10.1; Parlett §6.9): the probes only share the products, ``A [q_j^(1) … q_j^(p)]`` in one
    :func:`~sharpness.curvature.linop.apply_block`. A probe whose ``β`` falls to rounding level (``<= 10 ·
    sqrt(n) · eps · ‖T‖``: an invariant subspace) stops there and leaves the block, so each probe uses as many
    products as it would alone. Returns each probe's tridiagonal ``T`` (float64, CPU), at most ``steps × steps``.
    """
    p, n = starts.shape
    basis = torch.empty(p, steps, n, dtype=starts.dtype, device=starts.device)  # rows: the running probes
    basis[:, 0] = starts
    rows = torch.arange(p)  # which probe each row of `basis` belongs to
    alpha = torch.zeros(p, steps, dtype=torch.float64)
    beta = torch.zeros(p, steps, dtype=torch.float64)
    sizes = torch.full((p,), steps, dtype=torch.long)
    anorm = torch.zeros(p, dtype=torch.float64)
    eps = torch.finfo(starts.dtype).eps
    for j in range(steps):
        q = basis[:, j]
        w = apply_block(op, q.T.contiguous()).T
        a = (q * w).sum(dim=1)
        w = w - a[:, None] * q
        if j > 0:
            w = w - beta[rows, j - 1].to(w)[:, None] * basis[:, j - 1]
        total = torch.zeros(len(rows), j + 1, dtype=w.dtype, device=w.device)
        for _ in range(2):  # CGS2
            h = torch.einsum("pjn,pn->pj", basis[:, : j + 1], w)
            w = w - torch.einsum("pjn,pj->pn", basis[:, : j + 1], h)
            total += h
        alpha[rows, j] = (a + total[:, j]).to(device="cpu", dtype=torch.float64)
        b = torch.linalg.vector_norm(w, dim=1).to(device="cpu", dtype=torch.float64)
        anorm[rows] = torch.maximum(anorm[rows], alpha[rows, j].abs() + b + (beta[rows, j - 1] if j else 0.0))
        done = (b <= 10.0 * math.sqrt(n) * eps * anorm[rows]) | (j + 1 == steps)
        sizes[rows[done]] = j + 1
        beta[rows, j] = torch.where(done, 0.0, b)
        if bool(done.all()):
            break
        if bool(done.any()):  # drop the finished probes' rows (a copy, once per probe that stops early)
            keep = ~done
            basis, w, b, rows = basis[keep.to(basis.device)], w[keep.to(w.device)], b[keep], rows[keep]
        basis[:, j + 1] = w / b.to(w)[:, None]
    return [_tridiagonal(alpha[i, : sizes[i]], beta[i, : sizes[i] - 1]) for i in range(p)]


def _tridiagonal(diagonal: Tensor, off: Tensor) -> Tensor:
    """The symmetric tridiagonal matrix with ``diagonal`` and off-diagonal ``off``."""
    return torch.diag(diagonal) + torch.diag(off, 1) + torch.diag(off, -1)


def _check_grid(grid: object) -> Tensor | int:
    """``grid`` if it is an increasing 1-D tensor of at least 2 finite points, or as an int if an integer >= 2."""
    if not isinstance(grid, Tensor):
        return check_integer(grid, "grid", low=2, what="or a 1-D tensor of points")
    if grid.ndim != 1 or grid.numel() < 2 or not torch.isfinite(grid).all() or not (grid.diff() > 0).all():
        raise ValueError("grid must be a 1-D tensor of at least 2 finite, strictly increasing points")
    return grid


@renamed_arguments(num_vectors="num_probes", lanczos_steps="num_matvecs_per_probe")
def spectral_density(
    op: LinearOperator,
    *,
    num_probes: int = 10,
    num_matvecs_per_probe: int = 80,
    grid: Tensor | int = 1000,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
    probes_per_block: int | None = None,
) -> SpectralDensity:
    """The spectral density of a symmetric operator by stochastic Lanczos quadrature, smoothed by a Gaussian.

    Method (Lin, Saad & Yang 2016, §3.2; Ubaru, Chen & Saad 2017; Ghorbani et al. 2019): for each of
    ``num_probes`` random unit vectors ``v = r / sqrt(n)`` (Rademacher ``r``, so ``E[v vᵀ] = I/n``), run
    ``m = min(num_matvecs_per_probe, n)`` Lanczos steps (one product each) with full reorthogonalisation (as
    :func:`~sharpness.curvature.eigen.top_eigenvalues`; without it spurious copies of the extreme eigenvalues
    distort the weights). The eigen-decomposition ``T = S diag(θ) Sᵀ`` gives
    nodes ``θ_i`` and weights ``w_i = S_{1i}²``; the density is ``φ_σ(x) = mean_v Σ_i w_i N(x; θ_i, σ²)``. A run
    that reaches an invariant subspace stops early (its quadrature is then exact) and is padded with zero
    weights.

    The probes' Lanczos recurrences are independent but run in lockstep, ``probes_per_block`` at a time: each
    step is one block product ``A [q^(1) … q^(p)]`` through :func:`~sharpness.curvature.linop.apply_block` (a
    single batched pass when the operator has ``matmat``). The random vectors are drawn in the same order as one
    probe at a time and the arithmetic per probe is the same, so the result equals the one-probe-at-a-time
    computation up to rounding, whatever ``probes_per_block``. Cost: ``num_probes · m`` products (fewer if runs
    stop early); memory ``probes_per_block × m × n`` values of the operator's dtype for the bases.

    Defaults: ``σ = 0.01 · (max θ − min θ)`` over all nodes (``0.01 · max(|θ|, 1)`` if all nodes coincide), a
    resolution of 1% of the spectrum's width; an integer ``grid`` means that many equally spaced points on
    ``[min θ − 5σ, max θ + 5σ]``, so that the density integrates to 1 over the grid to within about 1e-6. A
    warning is issued if the grid spacing exceeds ``σ`` (the peaks are then not resolved).

    Args:
        op: a symmetric :class:`~sharpness.curvature.linop.LinearOperator`.
        num_probes: number of random start vectors (independent Lanczos runs), ``>= 1``. Deprecated alias:
            ``num_vectors``.
        num_matvecs_per_probe: Lanczos steps per probe, one product each, ``>= 1`` (capped at ``op.dim``); the
            total is ``num_probes · num_matvecs_per_probe``. Deprecated alias: ``lanczos_steps``.
        grid: number of grid points (``>= 2``) or an explicit increasing 1-D tensor of points.
        sigma: Gaussian width, ``> 0``; default as above.
        generator: source of the start vectors; default a fresh generator seeded 0 (the global RNG is never used).
        probes_per_block: how many recurrences share a block product, ``>= 1``; default all ``num_probes``. Lower
            it to bound the memory of the bases.

    Returns:
        :class:`SpectralDensity` in the operator's dtype and on its device.

    References: Lin, Saad & Yang, SIAM Review 58 (2016); Ubaru, Chen & Saad, SIMAX 38 (2017); Ghorbani,
    Krishnan & Xiao, ICML 2019.
    """
    op = counting(op)
    num_probes = check_integer(num_probes, "num_probes", low=1)
    num_matvecs_per_probe = check_integer(num_matvecs_per_probe, "num_matvecs_per_probe", low=1)
    grid = _check_grid(grid)
    if sigma is not None:
        sigma = check_real(sigma, "sigma", low=0.0, low_open=True, what="or None for the default")
    generator = default_generator(generator)
    probes_per_block = check_integer(
        num_probes if probes_per_block is None else probes_per_block, "probes_per_block", low=1
    )

    n = op.dim
    m = min(num_matvecs_per_probe, n)
    nodes = torch.empty(num_probes, m, dtype=torch.float64)
    weights = torch.zeros(num_probes, m, dtype=torch.float64)
    starts = torch.stack(
        [rademacher(n, dtype=op.dtype, device=op.device, generator=generator) for _ in range(num_probes)]
    )
    chunks = torch.split(starts / math.sqrt(n), probes_per_block)
    tridiagonals = [t for chunk in chunks for t in _lockstep_lanczos(op, chunk, m)]
    for i, tridiagonal in enumerate(tridiagonals):
        theta, s = torch.linalg.eigh(tridiagonal)
        w = s[0] ** 2
        size = theta.numel()
        nodes[i, :size] = theta
        nodes[i, size:] = theta[-1]
        weights[i, :size] = w / w.sum()

    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = DEFAULT_SIGMA_FRACTION * ((hi - lo) if hi > lo else max(abs(hi), 1.0))
    sigma = float(sigma)
    if isinstance(grid, int):
        pad = GRID_MARGIN_SIGMAS * sigma
        points = torch.linspace(lo - pad, hi + pad, grid, dtype=torch.float64)
    else:
        points = grid.detach().to(device="cpu", dtype=torch.float64)
    spacing = float(points.diff().max())
    if spacing > sigma:
        warnings.warn(
            f"grid spacing {spacing:.3g} exceeds sigma = {sigma:.3g}: the density's peaks are not resolved; "
            "use more grid points or a larger sigma",
            stacklevel=2,
        )
    density = gaussian_density(points, nodes, weights, sigma)

    def out(t: Tensor) -> Tensor:
        return t.to(device=op.device, dtype=op.dtype)

    return SpectralDensity(
        grid=out(points),
        density=out(density),
        nodes=out(nodes),
        weights=out(weights),
        sigma=sigma,
        dim=n,
        num_matvecs=op.num_matvecs,
    )
