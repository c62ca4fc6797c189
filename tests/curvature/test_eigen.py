"""Lanczos top-k eigenpairs, power iteration and the bulk ratio on matrices with known spectra."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator
from scipy.sparse.linalg import eigsh

from sharpness.curvature.eigen import EigenResult, bulk_ratio, power_iteration, top_eigenvalues
from sharpness.curvature.linop import CallableOperator, CountingOperator, DenseOperator, LinearOperator, counting

F64 = torch.float64


def known_spectrum(eigenvalues, seed=0, dtype=F64):
    """``(A, Q)`` with ``A = Q diag(λ) Qᵀ`` for a random orthogonal ``Q`` (its columns are the eigenvectors)."""
    lam = torch.as_tensor(eigenvalues, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=F64))
    a = q @ torch.diag(lam) @ q.T
    return ((a + a.T) / 2).to(dtype), q.to(dtype)


def mixed_spectrum(n=120, seed=0):
    """Separated top and bottom eigenvalues, a tight cluster, negative values and a uniform bulk."""
    g = torch.Generator().manual_seed(seed + 100)
    top = torch.tensor([5.0, 4.0, 3.5, 3.0, 2.6], dtype=F64)
    bottom = torch.tensor([-6.0, -5.5, -5.0, -4.5, -4.2], dtype=F64)
    cluster = 1.0 + 1e-3 * torch.rand(20, generator=g, dtype=F64)
    bulk = torch.rand(n - 30, generator=g, dtype=F64) * 4 - 2
    return torch.cat([top, bottom, cluster, bulk])


@pytest.fixture(scope="module")
def mixed():
    lam = mixed_spectrum()
    a, q = known_spectrum(lam, seed=1)
    return lam, a, q


def true_pairs(lam, q, k, which):
    order = torch.argsort(lam, descending=(which == "largest"))[:k]
    return lam[order], q[:, order].T


def test_dense_operator_is_a_linear_operator():
    a, _ = known_spectrum([1.0, 2.0, 3.0])
    op = DenseOperator(a)
    assert isinstance(op, LinearOperator)
    assert (op.dim, op.dtype, op.device) == (3, F64, torch.device("cpu"))
    torch.testing.assert_close(op.matvec(torch.ones(3, dtype=F64)), a @ torch.ones(3, dtype=F64))
    assert op.num_matvecs == 1
    with pytest.raises(ValueError, match="symmetric"):
        DenseOperator(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        DenseOperator(torch.ones(2, 3))


@pytest.mark.parametrize("block", [None, 1, "k"])
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_lanczos_matches_known_spectrum(mixed, k, which, block):
    lam, a, q = mixed
    op = DenseOperator(a)
    tol = 1e-8
    block_size = k if block == "k" else block
    res = top_eigenvalues(op, k, which=which, tol=tol, block_size=block_size)
    assert isinstance(res, EigenResult)
    assert res.block_size == (min(k, 2) if block is None else block_size)
    want_vals, want_vecs = true_pairs(lam, q, k, which)
    assert res.eigenvalues.shape == (k,) and res.eigenvectors.shape == (k, len(lam))
    assert res.eigenvalues.dtype == F64 and res.converged.dtype == torch.bool
    rel = (res.eigenvalues - want_vals).abs() / want_vals.abs()
    assert rel.max() <= 1e-6
    torch.testing.assert_close(torch.linalg.vector_norm(res.eigenvectors, dim=1), torch.ones(k, dtype=F64))
    cos = (res.eigenvectors * want_vecs).sum(dim=1).abs()
    assert cos.min() >= 1 - 1e-6
    assert bool(res.accurate.all())
    # With a block of 1, only the first position is certified against missed copies of a repeated eigenvalue.
    assert res.converged.tolist() == ([True] + [res.block_size > 1] * (k - 1))
    assert (res.residuals <= tol * res.eigenvalues.abs()).all()
    # The reported residual comes from the block Lanczos relation; it must equal the true one up to rounding.
    true_res = torch.linalg.vector_norm(res.eigenvectors @ a - res.eigenvalues[:, None] * res.eigenvectors, dim=1)
    torch.testing.assert_close(res.residuals, true_res, rtol=1e-6, atol=1e-12)
    assert res.num_matvecs == op.num_matvecs == res.iterations
    assert res.num_matvecs <= 100  # the default num_matvecs: converged within it


def test_smallest_finds_the_most_negative(mixed):
    lam, a, _ = mixed
    res = top_eigenvalues(DenseOperator(a), 3, which="smallest")
    torch.testing.assert_close(res.eigenvalues, torch.tensor([-6.0, -5.5, -5.0], dtype=F64), rtol=1e-6, atol=0)
    assert res.eigenvalues[0] == res.eigenvalues.min()


@pytest.mark.parametrize("which, scipy_which", [("largest", "LA"), ("smallest", "SA")])
def test_agrees_with_scipy_eigsh(mixed, which, scipy_which):
    _, a, _ = mixed
    op = DenseOperator(a)
    sp = ScipyLinearOperator(
        (op.dim, op.dim),
        matvec=lambda x: op.matvec(torch.from_numpy(np.ascontiguousarray(x).ravel())).numpy(),
        dtype=np.float64,
    )
    ref = np.sort(eigsh(sp, k=5, which=scipy_which, tol=1e-12, v0=np.ones(op.dim))[0])
    ref = ref[::-1] if which == "largest" else ref
    res = top_eigenvalues(op, 5, which=which, tol=1e-10)
    np.testing.assert_allclose(res.eigenvalues.numpy(), ref, rtol=1e-9)


def test_warm_start_from_top_eigenvector_needs_few_matvecs(mixed):
    lam, a, q = mixed
    op = DenseOperator(a)
    top_vec = q[:, torch.argmax(lam)]
    cold = top_eigenvalues(op, 1)
    warm = top_eigenvalues(op, 1, init=top_vec)
    assert warm.num_matvecs <= 2 < cold.num_matvecs
    assert abs(float(warm.eigenvalues[0]) - 5.0) <= 1e-12
    # A nearby vector (the previous step's eigenvector, say) still helps.
    noise = torch.randn(len(lam), generator=torch.Generator().manual_seed(3), dtype=F64)
    near = top_eigenvalues(op, 1, init=top_vec + 1e-3 * noise)
    assert near.num_matvecs < cold.num_matvecs
    assert abs(float(near.eigenvalues[0]) - 5.0) <= 1e-6 * 5.0


def test_invariant_subspace_stops_early_with_exact_values():
    lam = [3.0] * 40 + [1.0] * 50 + [-2.0] * 40  # only 3 distinct eigenvalues: the Krylov space has dimension 3
    a, _ = known_spectrum(lam, seed=2)
    op = DenseOperator(a)
    res = top_eigenvalues(op, 1, tol=0.0)  # tol 0: only the invariant subspace can stop it before num_matvecs
    assert res.iterations == res.num_matvecs == 3
    assert abs(float(res.eigenvalues[0]) - 3.0) <= 1e-13
    assert bool(res.converged.all()) and float(res.residuals[0]) <= 1e-12
    # A single vector sees each eigenvalue once: 3, 1, -2 is not the top 3 (3, 3, 3). Every value is exact, but
    # only the first position is certified.
    res3 = top_eigenvalues(op, 3, which="largest", tol=0.0, block_size=1)
    assert res3.num_matvecs == 3
    torch.testing.assert_close(res3.eigenvalues, torch.tensor([3.0, 1.0, -2.0], dtype=F64), rtol=0, atol=1e-12)
    assert res3.accurate.all() and res3.converged.tolist() == [True, False, False]
    # A block of 2 sees two copies: 3, 3, 1 after 3 steps (6 products), the third position flagged.
    pair = top_eigenvalues(op, 3, tol=0.0)
    assert pair.block_size == 2 and pair.num_matvecs == 6
    torch.testing.assert_close(pair.eigenvalues, torch.tensor([3.0, 3.0, 1.0], dtype=F64), rtol=0, atol=1e-12)
    assert pair.converged.tolist() == [True, True, False]
    # A block of 3 finds the top 3 and certifies it.
    triple = top_eigenvalues(op, 3, tol=0.0, block_size=3)
    assert triple.num_matvecs == 9 and bool(triple.converged.all())
    torch.testing.assert_close(triple.eigenvalues, torch.full((3,), 3.0, dtype=F64), rtol=0, atol=1e-12)
    # More pairs than the Krylov space holds: Lanczos continues from a fresh orthogonal vector; every value is exact.
    res5 = top_eigenvalues(op, 5, tol=0.0)
    assert res5.eigenvalues.shape == (5,) and float(res5.eigenvalues[0]) == pytest.approx(3.0, abs=1e-12)
    distance = (res5.eigenvalues[:, None] - torch.tensor([3.0, 1.0, -2.0], dtype=F64)).abs().min(dim=1).values
    assert distance.max() <= 1e-12


def repeated_and_distinct():
    """``{50, 20, 20, 10}`` and ``{50, 30, 20, 15, 10}`` above 200 eigenvalues ``5 · 0.98^i`` decaying in (0, 5]."""
    bulk = 5.0 * 0.98 ** torch.arange(200, dtype=F64)
    repeated = torch.cat([torch.tensor([50.0, 20.0, 20.0, 10.0], dtype=F64), bulk])
    distinct = torch.cat([torch.tensor([50.0, 30.0, 20.0, 15.0, 10.0], dtype=F64), bulk])
    return repeated, distinct


def test_single_vector_lanczos_misses_a_repeated_eigenvalue_and_a_block_finds_it():
    lam, _ = repeated_and_distinct()
    a, _ = known_spectrum(lam, seed=1)
    # One vector sees 20 once: 10 stands in for its second copy, with a tiny residual (accurate), but only the
    # first position is certified.
    single = top_eigenvalues(DenseOperator(a), 3, tol=1e-4, block_size=1)
    torch.testing.assert_close(single.eigenvalues, torch.tensor([50.0, 20.0, 10.0], dtype=F64), rtol=1e-6, atol=0)
    assert bool(single.accurate.all()) and single.converged.tolist() == [True, False, False]
    # The default block of 2 finds both copies and certifies them.
    block = top_eigenvalues(DenseOperator(a), 3, tol=1e-4)
    assert block.block_size == 2
    torch.testing.assert_close(block.eigenvalues, torch.tensor([50.0, 20.0, 20.0], dtype=F64), rtol=1e-6, atol=0)
    assert bool(block.converged.all())
    true_res = torch.linalg.vector_norm(block.eigenvectors @ a - block.eigenvalues[:, None] * block.eigenvectors, dim=1)
    torch.testing.assert_close(block.residuals, true_res, rtol=1e-6, atol=1e-12)
    # The two copies' vectors span the eigenspace of 20: orthonormal, each an eigenvector.
    pair = block.eigenvectors[1:]
    torch.testing.assert_close(pair @ pair.T, torch.eye(2, dtype=F64), rtol=0, atol=1e-6)
    # For the top 5 a block of 2 finds 50, 20, 20, 10 but cannot tell whether 20 has a third copy: positions
    # after the pair are left unconverged; a block of 3 certifies them.
    five = top_eigenvalues(DenseOperator(a), 5, tol=1e-4)
    torch.testing.assert_close(
        five.eigenvalues[:4], torch.tensor([50.0, 20.0, 20.0, 10.0], dtype=F64), rtol=1e-6, atol=0
    )
    assert five.converged.tolist() == [True, True, True, False, False] and bool(five.accurate.all())
    assert bool(top_eigenvalues(DenseOperator(a), 5, tol=1e-4, block_size=3).converged.all())


def test_block_size_trade_off():
    """The products the docstring quotes (seed 0, tol 1e-4, top 5 unless said): the block's price."""
    repeated, distinct = repeated_and_distinct()
    counts = {}
    for name, lam in (("repeated", repeated), ("distinct", distinct)):
        a, _ = known_spectrum(lam, seed=1)
        for k, b in ((1, 1), (5, 1), (5, 2), (5, 3)):
            res = top_eigenvalues(DenseOperator(a), k, tol=1e-4, block_size=b)
            assert bool(res.accurate.all())
            counts[name, k, b] = res.num_matvecs
    assert counts["distinct", 1, 1] == 7 and counts["repeated", 1, 1] == 6  # k = 1: the default is one vector
    assert (counts["distinct", 5, 1], counts["distinct", 5, 2], counts["distinct", 5, 3]) == (13, 20, 27)
    assert (counts["repeated", 5, 1], counts["repeated", 5, 2], counts["repeated", 5, 3]) == (34, 48, 57)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**20),
    n=st.integers(30, 70),
    block_size=st.integers(1, 3),
    multiplicities=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    extra=st.integers(0, 1),
    tol=st.sampled_from([1e-4, 1e-8]),
)
def test_planted_repeated_top_eigenvalues(seed, n, block_size, multiplicities, extra, tol):
    """Top eigenvalues 10 + 4j (+ jitter) with multiplicities up to 4, then 6, then a bulk in [-3, 3].

    Multiplicity <= block size: the top k are all found to tol. Always: a converged value is within tol of the
    eigenvalue of its rank (so within tol of some eigenvalue), also when a multiplicity exceeds the block.
    """
    g = torch.Generator().manual_seed(seed)
    levels = 10.0 + 4.0 * torch.arange(len(multiplicities), dtype=F64) + torch.rand(len(multiplicities), generator=g)
    planted = torch.repeat_interleave(levels, torch.tensor(multiplicities))
    bulk = torch.rand(n - len(planted) - 1, generator=g, dtype=F64) * 6 - 3
    lam = torch.cat([planted, torch.tensor([6.0], dtype=F64), bulk])
    a, _ = known_spectrum(lam, seed=seed)
    true = torch.sort(lam, descending=True).values
    k = max(len(planted) + extra, block_size)
    res = top_eigenvalues(DenseOperator(a), k, tol=tol, block_size=block_size, generator=g)
    slack = tol * res.eigenvalues.abs() + 1e-10
    nearest = (res.eigenvalues[:, None] - lam[None, :]).abs().min(dim=1).values
    assert ((nearest <= slack) | ~res.accurate).all()
    assert (((res.eigenvalues - true[:k]).abs() <= slack) | ~res.converged).all()
    assert bool(res.converged[0])
    if max(multiplicities) <= block_size:
        assert ((res.eigenvalues - true[:k]).abs() <= slack).all() and bool(res.accurate.all())


def test_block_products_go_through_matmat():
    a, _ = known_spectrum(mixed_spectrum(), seed=1)
    calls = []

    def block_product(v):
        calls.append(v.shape[1])
        return a @ v

    op = CallableOperator(lambda v: a @ v, a.shape[0], dtype=F64, matmat=block_product)
    res = top_eigenvalues(op, 4, block_size=2)
    assert set(calls) == {2} and sum(calls) == res.num_matvecs == op.num_matvecs == res.iterations
    torch.testing.assert_close(res.eigenvalues, torch.tensor([5.0, 4.0, 3.5, 3.0], dtype=F64), rtol=1e-6, atol=0)


def test_block_warm_start_and_an_exact_eigenvector_in_the_block(mixed):
    lam, a, q = mixed
    top_vec = q[:, torch.argmax(lam)]
    # The start vector is an eigenvector: its column deflates at once and is replaced by a random direction.
    res = top_eigenvalues(DenseOperator(a), 2, init=top_vec, block_size=2, tol=1e-8)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([5.0, 4.0], dtype=F64), rtol=1e-8, atol=0)
    assert abs(float(res.eigenvectors[0] @ top_vec)) >= 1 - 1e-10 and bool(res.converged.all())
    cold = top_eigenvalues(DenseOperator(a), 2, block_size=2, tol=1e-8)
    assert res.num_matvecs < cold.num_matvecs


def test_block_lanczos_in_float32_and_for_the_smallest():
    lam = torch.cat([torch.tensor([-7.0, -7.0, -6.0], dtype=F64), torch.linspace(-4.0, 4.0, 77, dtype=F64)])
    a, _ = known_spectrum(lam, seed=8, dtype=torch.float32)
    res = top_eigenvalues(DenseOperator(a), 3, which="smallest", tol=1e-5)
    assert res.eigenvalues.dtype == torch.float32 and res.eigenvectors.dtype == torch.float32
    torch.testing.assert_close(res.eigenvalues, torch.tensor([-7.0, -7.0, -6.0]), rtol=1e-5, atol=0)
    assert res.converged.tolist() == [True, True, False]  # a pair fills the block of 2: a third -7 could hide
    kw = {"which": "smallest", "tol": 1e-8, "criterion": "eigenvalue", "block_size": 3}
    by_bound = top_eigenvalues(DenseOperator(a.double()), 3, **kw)
    torch.testing.assert_close(by_bound.eigenvalues, torch.tensor([-7.0, -7.0, -6.0], dtype=F64), rtol=1e-8, atol=0)
    assert bool(by_bound.converged.all()) and (by_bound.error_bounds <= by_bound.residuals).all()


def test_lanczos_needs_far_fewer_matvecs_than_power_iteration_for_a_small_gap():
    lam = torch.cat([torch.tensor([1.0, 0.995], dtype=F64), torch.linspace(-0.5, 0.9, 98, dtype=F64)])
    a, _ = known_spectrum(lam, seed=4)
    lanczos = top_eigenvalues(DenseOperator(a), 1, tol=1e-10)
    lanczos_error = abs(float(lanczos.eigenvalues[0]) - 1.0)
    assert lanczos_error <= 1e-9
    # Ten times the products still leave power iteration far less accurate.
    power = power_iteration(DenseOperator(a), num_matvecs=10 * lanczos.num_matvecs, tol=0.0)
    assert power.num_matvecs == 10 * lanczos.num_matvecs
    assert abs(power.eigenvalue - 1.0) > 1e-6
    assert lanczos.num_matvecs <= 100


@pytest.mark.parametrize("dominant", [10.0, -10.0])
def test_power_iteration_finds_the_dominant_eigenvalue(dominant):
    g = torch.Generator().manual_seed(5)
    lam = torch.cat([torch.tensor([dominant, 5.0], dtype=F64), torch.rand(78, generator=g, dtype=F64) * 8 - 4])
    a, q = known_spectrum(lam, seed=6)
    loose = power_iteration(DenseOperator(a))  # PyHessian's tol 1e-3
    assert loose.converged and abs(loose.eigenvalue - dominant) <= 1e-2 * abs(dominant)
    tight = power_iteration(DenseOperator(a), tol=1e-12, num_matvecs=500)
    assert tight.converged and tight.num_matvecs < 500
    assert abs(tight.eigenvalue - dominant) <= 1e-8 * abs(dominant)
    assert abs(float(tight.eigenvector @ q[:, 0])) >= 1 - 1e-6
    assert float(torch.linalg.vector_norm(tight.eigenvector)) == pytest.approx(1.0)


def test_power_iteration_reports_non_convergence():
    lam = torch.cat([torch.tensor([1.0, 0.999], dtype=F64), torch.zeros(48, dtype=F64)])
    a, _ = known_spectrum(lam)
    res = power_iteration(DenseOperator(a), num_matvecs=3, tol=1e-12)
    assert not res.converged and res.num_matvecs == 3


def test_unconverged_lanczos_says_so():
    a, _ = known_spectrum(mixed_spectrum(), seed=1)
    res = top_eigenvalues(DenseOperator(a), 2, num_matvecs=4, tol=1e-12)
    assert res.iterations == 4 and not bool(res.converged.all())
    assert (res.residuals > 0).all()


def test_float32_operator():
    lam = mixed_spectrum()
    a, _ = known_spectrum(lam, seed=1, dtype=torch.float32)
    res = top_eigenvalues(DenseOperator(a), 2, tol=1e-5)
    assert res.eigenvalues.dtype == torch.float32 and res.eigenvectors.dtype == torch.float32
    torch.testing.assert_close(res.eigenvalues, torch.tensor([5.0, 4.0]), rtol=1e-5, atol=0)


def test_works_with_a_callable_operator_and_counts():
    a, _ = known_spectrum(mixed_spectrum(), seed=1)
    op = CallableOperator(lambda v: a @ v, a.shape[0], dtype=F64)
    res = top_eigenvalues(op, 1)
    assert op.num_matvecs == res.num_matvecs
    wrapped = counting(op)
    assert isinstance(wrapped, CountingOperator) and wrapped.num_matvecs == 0
    wrapped.matvec(torch.ones(a.shape[0], dtype=F64))
    assert wrapped.num_matvecs == 1 and op.num_matvecs == res.num_matvecs + 1


def test_products_are_detached_from_autograd():
    a, _ = known_spectrum(mixed_spectrum(), seed=1)
    scale = torch.ones((), dtype=F64, requires_grad=True)
    res = top_eigenvalues(CallableOperator(lambda v: scale * (a @ v), a.shape[0], dtype=F64), 2)
    assert not res.eigenvalues.requires_grad and not res.eigenvectors.requires_grad
    assert float(res.eigenvalues[0]) == pytest.approx(5.0)


def test_operator_returning_the_wrong_shape_is_an_error():
    op = CallableOperator(lambda v: v[:-1], 10, dtype=F64)
    with pytest.raises(ValueError, match="matvec"):
        top_eigenvalues(op, 1)


def test_same_seed_same_result_and_global_rng_untouched(mixed):
    _, a, _ = mixed
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    r1 = top_eigenvalues(DenseOperator(a), 3, generator=torch.Generator().manual_seed(7))
    r2 = top_eigenvalues(DenseOperator(a), 3, generator=torch.Generator().manual_seed(7))
    d1 = top_eigenvalues(DenseOperator(a), 3)
    d2 = top_eigenvalues(DenseOperator(a), 3)
    p1 = power_iteration(DenseOperator(a))
    p2 = power_iteration(DenseOperator(a))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(r1.eigenvalues, r2.eigenvalues) and torch.equal(r1.eigenvectors, r2.eigenvectors)
    assert torch.equal(d1.eigenvectors, d2.eigenvectors) and r1.num_matvecs == r2.num_matvecs
    assert p1.eigenvalue == p2.eigenvalue and torch.equal(p1.eigenvector, p2.eigenvector)


def test_bulk_ratio():
    assert bulk_ratio([1.0, 5.0, 2.0, 4.0, 3.0, 0.5]) == pytest.approx(5.0 / 1.0)
    assert bulk_ratio(torch.tensor([10.0, 8.0, 6.0, 4.0, 2.0])) == pytest.approx(5.0)
    a, _ = known_spectrum(mixed_spectrum(), seed=1)
    top5 = top_eigenvalues(DenseOperator(a), 5).eigenvalues
    assert bulk_ratio(top5) == pytest.approx(5.0 / 2.6, rel=1e-6)
    assert bulk_ratio([1.0, 1.0, 1.0, 1.0, 0.0]) == math.inf
    with pytest.raises(ValueError, match="eigenvalues"):
        bulk_ratio([3.0, 2.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="eigenvalues"):
        bulk_ratio(torch.ones(2, 5))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"k": 0}, "k"),
        ({"k": 31}, "k"),
        ({"k": 1.0}, "k"),
        ({"which": "top"}, "which"),
        ({"num_matvecs": 0}, "num_matvecs"),
        ({"k": 5, "num_matvecs": 4}, "num_matvecs"),
        ({"tol": -1e-3}, "tol"),
        ({"tol": float("nan")}, "tol"),
        ({"init": torch.ones(29, dtype=F64)}, "init"),
        ({"init": torch.zeros(30, dtype=F64)}, "init"),
        ({"init": torch.full((30,), float("inf"), dtype=F64)}, "init"),
        ({"check_every": 0}, "check_every"),
        ({"k": 3, "block_size": 0}, "block_size"),
        ({"k": 3, "block_size": 4}, "block_size"),
        ({"k": 3, "block_size": 1.0}, "block_size"),
        ({"k": 5, "block_size": 2, "num_matvecs": 5}, "num_matvecs"),
    ],
)
def test_top_eigenvalues_rejects_bad_arguments(kwargs, name):
    a, _ = known_spectrum(torch.linspace(-1, 1, 30, dtype=F64))
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        top_eigenvalues(DenseOperator(a), **kwargs)


@pytest.mark.parametrize(
    "kwargs, name", [({"num_matvecs": 0}, "num_matvecs"), ({"tol": -1.0}, "tol"), ({"init": torch.ones(3)}, "init")]
)
def test_power_iteration_rejects_bad_arguments(kwargs, name):
    a, _ = known_spectrum(torch.linspace(-1, 1, 30, dtype=F64))
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        power_iteration(DenseOperator(a), **kwargs)


def test_bad_generator_and_operator_types():
    a, _ = known_spectrum(torch.linspace(-1, 1, 30, dtype=F64))
    with pytest.raises(TypeError, match="generator"):
        top_eigenvalues(DenseOperator(a), 1, generator=0)
    with pytest.raises(TypeError, match="matvec"):
        top_eigenvalues(a, 1)
