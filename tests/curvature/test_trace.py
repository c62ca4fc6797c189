"""Hutchinson, Hutch++ and the Frobenius-norm estimator on matrices with known spectra."""

import math

import pytest
import torch

from sharpness.curvature.linop import CallableOperator, DenseOperator, rademacher
from sharpness.curvature.trace import FrobeniusEstimate, TraceEstimate, frobenius_norm, hutchinson_trace, hutchpp_trace

F64 = torch.float64


def known_spectrum(eigenvalues, seed=0):
    lam = torch.as_tensor(eigenvalues, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=F64))
    a = q @ torch.diag(lam) @ q.T
    return (a + a.T) / 2


@pytest.fixture(scope="module")
def indefinite():
    """n = 150: negative values, a cluster and a bulk."""
    g = torch.Generator().manual_seed(11)
    lam = torch.cat(
        [
            torch.tensor([6.0, 4.0, -3.0, -2.5], dtype=F64),
            0.5 + 1e-3 * torch.rand(30, generator=g, dtype=F64),
            torch.randn(116, generator=g, dtype=F64),
        ]
    )
    return lam, known_spectrum(lam, seed=12)


@pytest.fixture(scope="module")
def low_rank_plus_noise():
    """Ten eigenvalues of 100 on top of small noise: Hutchinson struggles, Hutch++ does not."""
    g = torch.Generator().manual_seed(21)
    lam = torch.cat([torch.full((10,), 100.0, dtype=F64), 0.5 * torch.randn(190, generator=g, dtype=F64)])
    return lam, known_spectrum(lam, seed=22)


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_within_four_standard_errors(indefinite, distribution):
    lam, a = indefinite
    true = float(lam.sum())
    for seed in range(5):
        est = hutchinson_trace(DenseOperator(a), 100, distribution=distribution, generator=gen(seed))
        assert isinstance(est, TraceEstimate)
        assert est.num_probes == est.num_matvecs == 100
        assert est.stderr > 0
        assert abs(est.value - true) <= 4 * est.stderr


def test_hutchinson_stderr_shrinks_like_one_over_sqrt_m(indefinite):
    _, a = indefinite
    small = [hutchinson_trace(DenseOperator(a), 100, generator=gen(s)).stderr for s in range(4)]
    large = [hutchinson_trace(DenseOperator(a), 400, generator=gen(s)).stderr for s in range(4)]
    ratio = (sum(large) / 4) / (sum(small) / 4)
    assert 0.4 <= ratio <= 0.62  # 1/sqrt(4) = 0.5


def test_hutchinson_rademacher_is_exact_for_a_diagonal_matrix():
    a = torch.diag(torch.arange(1.0, 21.0, dtype=F64))
    est = hutchinson_trace(DenseOperator(a), 5)
    assert est.value == pytest.approx(210.0, abs=1e-12) and est.stderr == pytest.approx(0.0, abs=1e-12)


def test_hutchpp_beats_hutchinson_on_low_rank_plus_noise(low_rank_plus_noise):
    lam, a = low_rank_plus_noise
    true = float(lam.sum())
    err_h, err_pp = [], []
    for seed in range(5):
        h = hutchinson_trace(DenseOperator(a), 99, generator=gen(seed))
        op = DenseOperator(a)
        pp = hutchpp_trace(op, 99, generator=gen(seed))
        assert pp.num_matvecs == op.num_matvecs == 99 and pp.num_probes == 33
        assert abs(pp.value - true) <= 4 * pp.stderr
        err_h.append(abs(h.value - true))
        err_pp.append(abs(pp.value - true))
    assert sum(err_pp) < 0.1 * sum(err_h)


@pytest.mark.parametrize("budget, probes", [(99, 33), (100, 34), (101, 35), (3, 1)])
def test_hutchpp_spends_exactly_its_budget(indefinite, budget, probes):
    _, a = indefinite
    op = DenseOperator(a)
    est = hutchpp_trace(op, budget)
    assert est.num_matvecs == op.num_matvecs == budget and est.num_probes == probes
    if probes == 1:
        assert math.isnan(est.stderr)


def test_hutchpp_is_exact_when_the_sketch_captures_the_range():
    lam = torch.cat([torch.tensor([5.0, 3.0, -2.0, 1.0, 0.5], dtype=F64), torch.zeros(95, dtype=F64)])
    a = known_spectrum(lam, seed=3)
    est = hutchpp_trace(DenseOperator(a), 30)
    assert est.value == pytest.approx(7.5, abs=1e-10) and est.stderr <= 1e-10


def test_hutchpp_budget_larger_than_dimension():
    lam = torch.linspace(-1.0, 2.0, 10, dtype=F64)
    est = hutchpp_trace(DenseOperator(known_spectrum(lam)), 60)  # sketch of 20 > n = 10 columns
    assert est.num_matvecs == 60 and est.value == pytest.approx(float(lam.sum()), abs=1e-10)


def hutchpp_one_column_at_a_time(a, budget, seed):
    """Meyer et al.'s Algorithm 1 with one product per vector, drawing the random vectors in the same order."""
    g, n, s = gen(seed), a.shape[0], budget // 3
    sketch = torch.stack([a @ rademacher(n, dtype=F64, device=a.device, generator=g) for _ in range(s)], dim=1)
    q, _ = torch.linalg.qr(sketch)
    exact = sum(float(q[:, i] @ (a @ q[:, i])) for i in range(q.shape[1]))
    samples = []
    for _ in range(budget - s - q.shape[1]):
        v = rademacher(n, dtype=F64, device=a.device, generator=g)
        v = v - q @ (q.T @ v)
        samples.append(float(v @ (a @ v)))
    return exact + sum(samples) / len(samples)


@pytest.mark.parametrize("budget", [3, 30, 99, 400])
def test_hutchpp_block_products_equal_the_column_by_column_algorithm(low_rank_plus_noise, budget):
    _, a = low_rank_plus_noise
    blocks = []

    def block_product(v):
        blocks.append(v.shape[1])
        return a @ v

    op = CallableOperator(lambda v: a @ v, a.shape[0], dtype=F64, matmat=block_product)
    est = hutchpp_trace(op, budget, generator=gen(4))
    s = budget // 3
    r = min(s, a.shape[0])
    assert blocks == [s, r, budget - s - r]  # the sketch, the basis, the probes: one block product each
    assert est.num_matvecs == op.num_matvecs == budget
    assert est.value == pytest.approx(hutchpp_one_column_at_a_time(a, budget, 4), rel=1e-12, abs=1e-9)


def test_frobenius_within_four_standard_errors(indefinite):
    lam, a = indefinite
    true = float(torch.linalg.vector_norm(lam))
    for seed in range(5):
        est = frobenius_norm(DenseOperator(a), 100, generator=gen(seed))
        assert isinstance(est, FrobeniusEstimate)
        assert est.num_probes == est.num_matvecs == 100
        assert abs(est.value - true) <= 4 * est.stderr
        assert abs(est.squared - true**2) <= 4 * est.squared_stderr
        assert est.value == pytest.approx(math.sqrt(est.squared))
        assert est.stderr == pytest.approx(est.squared_stderr / (2 * est.value))


def test_frobenius_of_zero_is_zero():
    est = frobenius_norm(DenseOperator(torch.zeros(8, 8, dtype=F64)), 4)
    assert est.value == 0.0 and est.stderr == 0.0 and est.squared == 0.0


def test_same_seed_same_estimates_and_global_rng_untouched(indefinite):
    _, a = indefinite
    torch.manual_seed(99)
    state = torch.get_rng_state()
    for fn, kwargs in ((hutchinson_trace, {}), (hutchpp_trace, {}), (frobenius_norm, {})):
        assert fn(DenseOperator(a), generator=gen(3), **kwargs) == fn(DenseOperator(a), generator=gen(3), **kwargs)
        assert fn(DenseOperator(a), **kwargs) == fn(DenseOperator(a), **kwargs)
    assert torch.equal(torch.get_rng_state(), state)


def test_float32_operator(indefinite):
    lam, a = indefinite
    est = hutchpp_trace(DenseOperator(a.float()), 60)
    assert abs(est.value - float(lam.sum())) <= 4 * est.stderr + 1e-3


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda op: hutchinson_trace(op, 0), "num_matvecs"),
        (lambda op: hutchinson_trace(op, 2.5), "num_matvecs"),
        (lambda op: hutchinson_trace(op, 10, distribution="uniform"), "distribution"),
        (lambda op: hutchpp_trace(op, 2), "num_matvecs"),
        (lambda op: frobenius_norm(op, 0), "num_matvecs"),
    ],
)
def test_bad_arguments(call, name):
    op = DenseOperator(torch.eye(5, dtype=F64))
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call(op)


def test_bad_generator():
    with pytest.raises(TypeError, match="generator"):
        hutchinson_trace(DenseOperator(torch.eye(5, dtype=F64)), 3, generator=123)
