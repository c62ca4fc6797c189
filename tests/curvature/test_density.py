"""Stochastic Lanczos quadrature: the smoothed spectral density of matrices with known spectra."""

import pytest
import torch

from sharpness.curvature.density import SpectralDensity, _lockstep_lanczos, spectral_density
from sharpness.curvature.linop import CallableOperator, DenseOperator
from sharpness.curvature.trace import frobenius_norm, hutchinson_trace

F64 = torch.float64


def known_spectrum(eigenvalues, seed=0, dtype=F64):
    lam = torch.as_tensor(eigenvalues, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=F64))
    a = q @ torch.diag(lam) @ q.T
    return ((a + a.T) / 2).to(dtype)


@pytest.fixture(scope="module")
def clusters():
    """n = 200 in three clusters (1/4 near −1, 1/2 near 0.5, 1/4 near 3) plus two outliers."""
    g = torch.Generator().manual_seed(31)
    lam = torch.cat(
        [
            -1.0 + 0.01 * torch.randn(50, generator=g, dtype=F64),
            0.5 + 0.01 * torch.randn(98, generator=g, dtype=F64),
            3.0 + 0.01 * torch.randn(50, generator=g, dtype=F64),
            torch.tensor([-4.0, 8.0], dtype=F64),
        ]
    )
    return lam, known_spectrum(lam, seed=32)


@pytest.fixture(scope="module")
def slq(clusters):
    _, a = clusters
    op = DenseOperator(a)
    return spectral_density(op, num_probes=10, num_matvecs_per_probe=40), op


def test_shapes_and_matvec_count(slq):
    d, op = slq
    assert isinstance(d, SpectralDensity)
    assert d.nodes.shape == d.weights.shape == (10, 40)
    assert d.grid.shape == d.density.shape == (1000,)
    assert d.num_matvecs == op.num_matvecs == 400 and d.dim == 200
    assert d.grid.dtype == d.density.dtype == d.nodes.dtype == F64
    assert (d.density >= 0).all() and (d.grid.diff() > 0).all()


def test_density_integrates_to_one(slq):
    d, _ = slq
    assert float(torch.trapezoid(d.density, d.grid)) == pytest.approx(1.0, abs=1e-3)


def test_weights_sum_to_one_per_vector(slq):
    d, _ = slq
    torch.testing.assert_close(d.weights.sum(dim=1), torch.ones(10, dtype=F64), rtol=0, atol=1e-12)
    assert (d.weights >= 0).all()


def test_nodes_lie_within_the_spectrum(clusters, slq):
    lam, _ = clusters
    d, _ = slq
    assert float(d.nodes.min()) >= float(lam.min()) - 1e-10
    assert float(d.nodes.max()) <= float(lam.max()) + 1e-10
    # The extreme nodes are the converged extreme eigenvalues.
    assert float(d.nodes.min()) == pytest.approx(-4.0, abs=1e-8)
    assert float(d.nodes.max()) == pytest.approx(8.0, abs=1e-8)


def test_mass_sits_near_the_true_eigenvalues(clusters, slq):
    lam, _ = clusters
    d, _ = slq
    near = (d.grid[:, None] - lam[None, :]).abs().min(dim=1).values <= 3 * d.sigma
    mass_near = float(torch.trapezoid(d.density * near, d.grid))
    assert mass_near >= 0.9
    # Each cluster gets about its share of the eigenvalues.
    for low, high, share in ((-1.2, -0.8, 0.25), (0.3, 0.7, 0.49), (2.8, 3.2, 0.25)):
        assert d.mass_in(low, high) == pytest.approx(share, abs=0.07)
        inside = (d.grid >= low) & (d.grid <= high)
        assert float(torch.trapezoid(d.density * inside, d.grid)) == pytest.approx(share, abs=0.07)


def test_default_sigma_and_grid(clusters, slq):
    d, _ = slq
    span = float(d.nodes.max() - d.nodes.min())
    assert d.sigma == pytest.approx(0.01 * span)
    assert float(d.grid[0]) == pytest.approx(float(d.nodes.min()) - 5 * d.sigma)
    assert float(d.grid[-1]) == pytest.approx(float(d.nodes.max()) + 5 * d.sigma)


def test_quadrature_trace_matches_hutchinson_with_the_same_probes(clusters):
    # Gauss quadrature with m nodes is exact for polynomials of degree < 2m, so with the same Rademacher
    # probes the SLQ estimates of tr(A) and tr(A²) equal Hutchinson's and the Frobenius estimator's.
    lam, a = clusters
    d = spectral_density(
        DenseOperator(a), num_probes=8, num_matvecs_per_probe=10, generator=torch.Generator().manual_seed(5)
    )
    h = hutchinson_trace(DenseOperator(a), 8, generator=torch.Generator().manual_seed(5))
    f = frobenius_norm(DenseOperator(a), 8, generator=torch.Generator().manual_seed(5))
    assert d.trace(lambda x: x) == pytest.approx(h.value, rel=1e-10)
    assert d.trace(lambda x: x**2) == pytest.approx(f.squared, rel=1e-10)
    assert abs(d.trace(lambda x: x) - float(lam.sum())) <= 4 * h.stderr


def test_invariant_subspace_gives_exact_nodes_and_padding():
    lam = [2.0] * 20 + [0.5] * 40 + [-1.0] * 20
    d = spectral_density(DenseOperator(known_spectrum(lam, seed=7)), num_probes=4, num_matvecs_per_probe=30)
    assert d.num_matvecs == 4 * 3  # each run stops after 3 steps: the Krylov space is exhausted
    torch.testing.assert_close(d.nodes[:, :3], torch.tensor([[-1.0, 0.5, 2.0]] * 4, dtype=F64), rtol=0, atol=1e-12)
    assert (d.weights[:, 3:] == 0).all() and (d.nodes[:, 3:] == d.nodes[:, 2:3]).all()
    torch.testing.assert_close(d.weights.sum(dim=1), torch.ones(4, dtype=F64), rtol=0, atol=1e-12)
    assert d.mass_in(0.4, 0.6) == pytest.approx(0.5, abs=0.1)
    assert float(torch.trapezoid(d.density, d.grid)) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("probes_per_block", [1, 3, 10])
def test_lockstep_recurrences_equal_one_probe_at_a_time(clusters, slq, probes_per_block):
    """The default runs all 10 recurrences in lockstep; 1 per block is the unbatched computation."""
    _, a = clusters
    d, _ = slq
    blocks = []

    def block_product(v):
        blocks.append(v.shape[1])
        return a @ v

    op = CallableOperator(lambda v: a @ v, a.shape[0], dtype=F64, matmat=block_product)
    chunked = spectral_density(op, num_probes=10, num_matvecs_per_probe=40, probes_per_block=probes_per_block)
    assert chunked.num_matvecs == op.num_matvecs == d.num_matvecs == 400
    sizes = [len(c) for c in torch.arange(10).split(probes_per_block)]
    assert blocks == [size for size in sizes for _ in range(40)]  # one block product per Lanczos step
    torch.testing.assert_close(chunked.nodes, d.nodes, rtol=0, atol=1e-12)
    torch.testing.assert_close(chunked.weights, d.weights, rtol=0, atol=1e-10)
    torch.testing.assert_close(chunked.density, d.density, rtol=0, atol=1e-12)


def test_a_probe_that_stops_early_leaves_the_block():
    """A probe in an invariant subspace of dimension 2 stops after 2 products while the others go on."""
    lam = torch.cat([torch.tensor([3.0, -1.0], dtype=F64), torch.linspace(0.0, 1.0, 58, dtype=F64)])
    a = known_spectrum(lam, seed=9)
    q = torch.linalg.eigh(a).eigenvectors
    early = (q[:, 0] + q[:, -1]) / 2**0.5  # spans an invariant subspace with A early
    blocks = []

    def block_product(v):
        blocks.append(v.shape[1])
        return a @ v

    op = CallableOperator(lambda v: a @ v, 60, dtype=F64, matmat=block_product)
    starts = torch.stack([early, torch.ones(60, dtype=F64) / 60**0.5])
    t_early, t_full = _lockstep_lanczos(op, starts, 10)
    assert blocks == [2, 2] + [1] * 8 and op.num_matvecs == 12
    assert t_early.shape == (2, 2) and t_full.shape == (10, 10)
    torch.testing.assert_close(torch.linalg.eigvalsh(t_early), torch.tensor([-1.0, 3.0], dtype=F64))


def test_explicit_grid_and_sigma(clusters):
    _, a = clusters
    grid = torch.linspace(-6.0, 10.0, 4001, dtype=F64)
    d = spectral_density(DenseOperator(a), num_probes=3, num_matvecs_per_probe=20, grid=grid, sigma=0.05)
    assert torch.equal(d.grid, grid) and d.sigma == 0.05
    assert float(torch.trapezoid(d.density, d.grid)) == pytest.approx(1.0, abs=1e-3)


def test_coarse_grid_warns(clusters):
    _, a = clusters
    with pytest.warns(UserWarning, match="grid spacing"):
        spectral_density(DenseOperator(a), num_probes=1, num_matvecs_per_probe=5, grid=20)


def test_steps_capped_at_dimension_and_float32():
    lam = torch.linspace(-1.0, 1.0, 12, dtype=F64)
    d = spectral_density(
        DenseOperator(known_spectrum(lam, dtype=torch.float32)), num_probes=2, num_matvecs_per_probe=50
    )
    assert d.nodes.shape == (2, 12) and d.density.dtype == torch.float32
    torch.testing.assert_close(d.nodes[0], lam.float(), rtol=0, atol=1e-5)
    assert float(torch.trapezoid(d.density, d.grid)) == pytest.approx(1.0, abs=1e-3)


def test_same_seed_same_density_and_global_rng_untouched(clusters):
    _, a = clusters
    torch.manual_seed(5)
    state = torch.get_rng_state()
    kw = {"num_probes": 3, "num_matvecs_per_probe": 15}
    d1 = spectral_density(DenseOperator(a), generator=torch.Generator().manual_seed(4), **kw)
    d2 = spectral_density(DenseOperator(a), generator=torch.Generator().manual_seed(4), **kw)
    d3 = spectral_density(DenseOperator(a), generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(d1.density, d2.density) and torch.equal(d1.nodes, d2.nodes)
    assert not torch.equal(d1.nodes, d3.nodes)
    assert torch.equal(
        spectral_density(DenseOperator(a), **kw).density, spectral_density(DenseOperator(a), **kw).density
    )
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_probes": 0}, "num_probes"),
        ({"num_matvecs_per_probe": 0}, "num_matvecs_per_probe"),
        ({"grid": 1}, "grid"),
        ({"grid": torch.ones(3, 3)}, "grid"),
        ({"grid": torch.tensor([1.0, 0.0, 2.0])}, "grid"),
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -1.0}, "sigma"),
        ({"sigma": float("inf")}, "sigma"),
        ({"probes_per_block": 0}, "probes_per_block"),
    ],
)
def test_bad_arguments(kwargs, name):
    op = DenseOperator(torch.eye(6, dtype=F64))
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        spectral_density(op, **kwargs)
