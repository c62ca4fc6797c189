"""ρ-sharpness (worst case, average case, m-sharpness) against closed forms, brute force, and its contracts."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from model_state import assert_state_unchanged, snapshot_state
from torch import nn

from sharpness.curvature.rho_sharpness import (
    MSharpness,
    SharpnessEstimate,
    average_case_sharpness,
    m_sharpness,
    worst_case_sharpness,
)

F = nn.functional
INF = math.inf


# ---------------------------------------------------------------------------------------------- problems


def _least_squares_at_minimum(n: int = 20, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A linear model at the exact least-squares minimiser of F.mse_loss; returns (model, x, y, Hessian)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.3 * torch.randn(
        n, 1, generator=gen, dtype=torch.float64
    )
    design = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution.squeeze(1)
    model = nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight.copy_(solution[:3].unsqueeze(0))
        model.bias.copy_(solution[3:])
    return model, x, y, 2.0 / n * design.T @ design  # the loss is exactly quadratic: this is its Hessian


class TwoWeights(nn.Module):
    """f(x) = w2 · tanh(w1 · x): a non-convex loss in 2 parameters, for brute force over the ball."""

    def __init__(self, w1: float, w2: float) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.tensor(w1, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.tensor(w2, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2 * torch.tanh(self.w1 * x)


def _two_weight_problem() -> tuple[TwoWeights, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, generator=gen, dtype=torch.float64)
    y = 1.5 * torch.tanh(0.8 * x) + 0.2 * torch.randn(16, generator=gen, dtype=torch.float64)
    return TwoWeights(0.6, 1.2), x, y


def _grid_loss(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((w2[..., None] * torch.tanh(w1[..., None] * x) - y) ** 2).mean(-1)


def _grid_maximum(model: TwoWeights, x, y, rho: float, p: float, adaptive: bool) -> float:
    """max over ||δ ⊘ c||_p ≤ ρ of L(w + δ) − L(w) on a fine grid of the (scaled) ball."""
    w1, w2 = float(model.w1.detach()), float(model.w2.detach())
    c1, c2 = (abs(w1), abs(w2)) if adaptive else (1.0, 1.0)
    if math.isinf(p):
        side = torch.linspace(-rho, rho, 801, dtype=torch.float64)
        z1, z2 = torch.meshgrid(side, side, indexing="ij")
    else:
        radius = torch.linspace(0.0, rho, 201, dtype=torch.float64)
        angle = torch.linspace(0.0, 2 * math.pi, 2881, dtype=torch.float64)
        r, a = torch.meshgrid(radius, angle, indexing="ij")
        z1, z2 = r * torch.cos(a), r * torch.sin(a)
    values = _grid_loss(w1 + c1 * z1, w2 + c2 * z2, x, y)
    base = _grid_loss(torch.tensor(w1, dtype=torch.float64), torch.tensor(w2, dtype=torch.float64), x, y)
    return float(values.max() - base)


def _relu_net(seed: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 1)).double()


def _regression_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.randn(n, 1, generator=gen, dtype=torch.float64)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ---------------------------------------------------------------------------------------------- values


def test_at_a_minimum_worst_exceeds_average_exceeds_zero_and_both_match_the_quadratic() -> None:
    model, x, y, hessian = _least_squares_at_minimum()
    rho = 0.3
    eigenvalues = torch.linalg.eigvalsh(hessian)
    worst = worst_case_sharpness(model, F.mse_loss, (x, y), rho)
    average = average_case_sharpness(model, F.mse_loss, (x, y), rho, num_probes=200)
    assert isinstance(worst, SharpnessEstimate) and worst.kind == "worst" and average.kind == "average"
    assert worst.value >= average.value >= 0.0
    # L(w+δ) − L(w) = ½ δᵀHδ at the minimiser: the worst case is ½ρ²λ_max, the mean ½(ρ²/d) tr(H)
    assert worst.value == pytest.approx(0.5 * rho**2 * float(eigenvalues[-1]), rel=1e-3)  # λ_2/λ_1 = 0.72
    longer = worst_case_sharpness(model, F.mse_loss, (x, y), rho, steps=80)
    assert longer.value == pytest.approx(0.5 * rho**2 * float(eigenvalues[-1]), rel=1e-10)
    assert worst.perturbation_norm == pytest.approx(rho)
    expected_average = 0.5 * rho**2 / 4 * float(eigenvalues.sum())
    assert abs(average.value - expected_average) < 4 * average.stderr
    assert average.perturbation_norm == pytest.approx(rho, rel=0.1)  # sqrt(mean ||z||²) ≈ ρ
    sphere = average_case_sharpness(model, F.mse_loss, (x, y), rho, num_probes=200, distribution="sphere")
    assert sphere.perturbation_norm == pytest.approx(rho, rel=1e-12)
    assert abs(sphere.value - expected_average) < 4 * sphere.stderr
    # L∞: a convex quadratic is maximised at a vertex of the box; there are 2⁴. Every vertex v = ρ sign(Hv) is a
    # local maximum where sign ascent stops, so one run is a lower bound; the best of a few random starts is exact.
    vertices = torch.tensor(list(itertools.product([-rho, rho], repeat=4)), dtype=torch.float64)
    box_maximum = float((0.5 * (vertices @ hessian * vertices).sum(1)).max())
    worst_inf = worst_case_sharpness(model, F.mse_loss, (x, y), rho, p=INF)
    assert worst.value <= worst_inf.value <= box_maximum * (1 + 1e-12)  # the L2 ball lies inside the box
    assert worst_inf.value >= average_case_sharpness(model, F.mse_loss, (x, y), rho, num_probes=50).value >= 0
    restarts = [
        worst_case_sharpness(
            model, F.mse_loss, (x, y), rho, p=INF, random_start=True, generator=torch.Generator().manual_seed(seed)
        ).value
        for seed in range(8)
    ]
    assert max(restarts) == pytest.approx(box_maximum, rel=1e-10)


def test_a_zero_gradient_does_not_stall_the_ascent() -> None:
    """At w = 0 with y = 0 the gradient is exactly 0: the ascent leaves along a random direction."""
    model, x, _, _ = _least_squares_at_minimum()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    y = torch.zeros(len(x), 1, dtype=torch.float64)
    design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    lam_max = float(torch.linalg.eigvalsh(2.0 / len(x) * design.T @ design)[-1])
    estimate = worst_case_sharpness(model, F.mse_loss, (x, y), 0.5, steps=100)
    assert estimate.loss == 0.0
    assert estimate.value == pytest.approx(0.5 * 0.25 * lam_max, rel=1e-10)


@pytest.mark.parametrize("p", [2, INF])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("rho", [0.1, 0.5])
def test_worst_case_matches_brute_force_over_the_ball(p: float, adaptive: bool, rho: float) -> None:
    model, x, y = _two_weight_problem()
    reference = _grid_maximum(model, x, y, rho, p, adaptive)
    estimate = worst_case_sharpness(model, F.mse_loss, (x, y), rho, p=p, adaptive=adaptive)
    assert reference > 0
    assert estimate.value == pytest.approx(reference, rel=1e-3)
    assert estimate.value <= reference * (1 + 1e-3)  # cannot beat the true maximum (up to the grid's resolution)


def test_one_step_is_sams_first_order_perturbation() -> None:
    model = _relu_net()
    x, y = _regression_data(12, 5)
    rho = 0.05
    loss = F.mse_loss(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    g = torch.cat([t.reshape(-1) for t in grads])
    w = _flat(model)
    c = w.abs()
    candidates = {
        (2, False): rho * g / g.norm(),
        (INF, False): rho * g.sign(),
        (2, True): rho * c**2 * g / (c * g).norm(),  # ASAM's ε with T_w = |w|
    }
    for (p, adaptive), delta in candidates.items():
        probe = _relu_net()
        torch.nn.utils.vector_to_parameters(w + delta, probe.parameters())
        sam_gap = float(F.mse_loss(probe(x), y).detach()) - float(loss.detach())
        estimate = worst_case_sharpness(model, F.mse_loss, (x, y), rho, p=p, adaptive=adaptive, steps=1)
        assert sam_gap > 0
        assert estimate.value == pytest.approx(sam_gap, rel=1e-10)
        assert estimate.num_evaluations == 2
        more = worst_case_sharpness(model, F.mse_loss, (x, y), rho, p=p, adaptive=adaptive, steps=10)
        assert more.value >= estimate.value


def test_zero_radius_gives_zero() -> None:
    model = _relu_net()
    x, y = _regression_data(8, 6)
    assert worst_case_sharpness(model, F.mse_loss, (x, y), 0.0).value == 0.0
    assert average_case_sharpness(model, F.mse_loss, (x, y), 0.0).value == 0.0


# ---------------------------------------------------------------------------------------------- adaptive scale


def _rescaled(model: nn.Module, s: float) -> nn.Module:
    """The same function: the first layer times s, the second divided by s (ReLU is positively homogeneous)."""
    other = _relu_net()
    with torch.no_grad():
        other[0].weight.copy_(model[0].weight * s)
        other[0].bias.copy_(model[0].bias * s)
        other[2].weight.copy_(model[2].weight / s)
        other[2].bias.copy_(model[2].bias)
    return other


def test_adaptive_sharpness_is_invariant_to_a_rescaling_the_plain_one_is_not() -> None:
    model = _relu_net()
    other = _rescaled(model, 4.0)
    x, y = _regression_data(16, 7)
    torch.testing.assert_close(model(x), other(x), rtol=1e-12, atol=1e-12)
    rho = 0.1
    for p in (2, INF):
        a = worst_case_sharpness(model, F.mse_loss, (x, y), rho, p=p, adaptive=True).value
        b = worst_case_sharpness(other, F.mse_loss, (x, y), rho, p=p, adaptive=True).value
        assert a == pytest.approx(b, rel=1e-8)
        plain_a = worst_case_sharpness(model, F.mse_loss, (x, y), rho, p=p).value
        plain_b = worst_case_sharpness(other, F.mse_loss, (x, y), rho, p=p).value
        assert abs(plain_a - plain_b) > 0.1 * max(plain_a, plain_b)
    a = average_case_sharpness(model, F.mse_loss, (x, y), rho, adaptive=True)
    b = average_case_sharpness(other, F.mse_loss, (x, y), rho, adaptive=True)
    assert a.value == pytest.approx(b.value, rel=1e-8)
    plain_a = average_case_sharpness(model, F.mse_loss, (x, y), rho).value
    plain_b = average_case_sharpness(other, F.mse_loss, (x, y), rho).value
    assert abs(plain_a - plain_b) > 0.1 * max(abs(plain_a), abs(plain_b))


@pytest.mark.parametrize("p", [2, INF])
@pytest.mark.parametrize("eta", [0.0, 0.1])
def test_every_evaluated_point_lies_in_the_scaled_ball(p: float, eta: float) -> None:
    model = _relu_net()
    with torch.no_grad():
        model[0].weight[0, 0] = 0.0  # c = |w| + eta is 0 here when eta = 0: never perturbed
    w0 = _flat(model)
    c = w0.abs() + eta
    zero = 0  # flat index of model[0].weight[0, 0]
    x, y = _regression_data(10, 8)
    seen: list[torch.Tensor] = []

    def spying_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen.append(_flat(model))
        return F.mse_loss(outputs, targets)

    rho = 0.2
    worst_case_sharpness(model, spying_loss, (x, y), rho, p=p, adaptive=True, eta=eta, random_start=True)
    average_case_sharpness(model, spying_loss, (x, y), rho, adaptive=True, eta=eta, distribution="sphere")
    assert len(seen) > 30
    deltas = torch.stack(seen) - w0
    moved = False
    for delta in deltas:
        z = torch.where(c > 0, delta / c, torch.zeros_like(delta))
        assert float(torch.linalg.vector_norm(z, p)) <= rho * (1 + 1e-12)  # ||z||_∞ ≤ ||z||_2 for the spheres
        if eta == 0.0:
            assert delta[zero] == 0.0
        moved |= bool(delta[zero] != 0.0)
    assert moved == (eta > 0)
    assert torch.equal(_flat(model), w0)


# ---------------------------------------------------------------------------------------------- model state


def _bn_model() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 1)).double()


MEASUREMENTS = [
    pytest.param(lambda m, loss, d, **k: worst_case_sharpness(m, loss, d, 0.1, **k), id="worst-l2"),
    pytest.param(
        lambda m, loss, d, **k: worst_case_sharpness(m, loss, d, 0.1, p=INF, adaptive=True, **k), id="worst-linf"
    ),
    pytest.param(
        lambda m, loss, d, **k: worst_case_sharpness(m, loss, d, 0.1, random_start=True, **k), id="worst-rand"
    ),
    pytest.param(lambda m, loss, d, **k: average_case_sharpness(m, loss, d, 0.1, adaptive=True, **k), id="average"),
    pytest.param(lambda m, loss, d, **k: m_sharpness(m, loss, d[0], d[1], 4, 0.1, **k), id="m-worst"),
    pytest.param(lambda m, loss, d, **k: m_sharpness(m, loss, d[0], d[1], 4, 0.1, kind="average", **k), id="m-avg"),
]


@pytest.mark.parametrize("measure", MEASUREMENTS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_model_state_is_untouched(measure, mode: str) -> None:
    model = _bn_model()
    x, y = _regression_data(12, 9)
    F.mse_loss(model(x), y).backward()  # gradients and running statistics that must survive
    model[1].eval()  # mixed modes must survive too
    before = snapshot_state(model)
    measure(model, F.mse_loss, (x, y), mode=mode)
    assert_state_unchanged(model, before)


@pytest.mark.parametrize("measure", MEASUREMENTS)
def test_model_state_is_restored_when_the_loss_raises(measure) -> None:
    model = _bn_model()
    x, y = _regression_data(12, 10)
    F.mse_loss(model(x), y).backward()
    before = snapshot_state(model)
    calls = []

    def exploding_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 3:  # after the parameters have been perturbed
            raise RuntimeError("loss failed")
        return F.mse_loss(outputs, targets)

    with pytest.raises(RuntimeError, match="loss failed"):
        measure(model, exploding_loss, (x, y), mode="train")
    assert len(calls) == 3
    assert_state_unchanged(model, before)


def test_parameter_filter_perturbs_only_the_selected_parameters() -> None:
    model = _relu_net()
    x, y = _regression_data(10, 11)
    first = model[0].weight.detach().clone()
    seen = []

    def spying_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen.append(torch.equal(model[0].weight, first))
        return F.mse_loss(outputs, targets)

    estimate = worst_case_sharpness(model, spying_loss, (x, y), 0.1, params=["2"])
    average_case_sharpness(model, spying_loss, (x, y), 0.1, params=["2"])
    assert all(seen) and estimate.value > 0
    assert estimate.value < worst_case_sharpness(model, F.mse_loss, (x, y), 0.1).value


# ---------------------------------------------------------------------------------------------- m-sharpness


@pytest.mark.parametrize("kind", ["worst", "average"])
def test_m_equal_to_n_is_the_full_batch_value(kind: str) -> None:
    model = _relu_net()
    x, y = _regression_data(10, 12)
    result = m_sharpness(model, F.mse_loss, x, y, 10, 0.2, kind=kind)
    measure = worst_case_sharpness if kind == "worst" else average_case_sharpness
    full = measure(model, F.mse_loss, (x, y), 0.2)
    assert isinstance(result, MSharpness)
    assert result.per_batch == (full.value,) and result.value == full.value
    assert result.num_batches == 1 and math.isnan(result.stderr) and result.loss == full.loss


def test_m_sharpness_averages_disjoint_batches_and_drops_the_remainder() -> None:
    model = _relu_net()
    x, y = _regression_data(11, 13)
    result = m_sharpness(model, F.mse_loss, x, y, 3, 0.2, steps=5)
    assert len(result.per_batch) == 11 // 3 == result.num_batches and result.m == 3
    direct = [worst_case_sharpness(model, F.mse_loss, (x[i : i + 3], y[i : i + 3]), 0.2, steps=5) for i in (0, 3, 6)]
    assert result.per_batch == tuple(d.value for d in direct)
    values = torch.tensor(result.per_batch, dtype=torch.float64)
    assert result.value == pytest.approx(float(values.mean()), rel=1e-15)
    assert result.stderr == pytest.approx(float(values.std()) / math.sqrt(3), rel=1e-12)
    # average kind: one generator shared by the batches in turn
    averaged = m_sharpness(model, F.mse_loss, x, y, 5, 0.2, kind="average", num_probes=4)
    gen = torch.Generator().manual_seed(0)
    direct = [
        average_case_sharpness(model, F.mse_loss, (x[i : i + 5], y[i : i + 5]), 0.2, num_probes=4, generator=gen)
        for i in (0, 5)
    ]
    assert averaged.per_batch == tuple(d.value for d in direct)
    # smaller batches: m = 1 gives n entries
    assert m_sharpness(model, F.mse_loss, x, y, 1, 0.2, steps=2).num_batches == 11


# ---------------------------------------------------------------------------------------------- randomness


def test_same_generator_seed_same_result_and_global_rng_untouched() -> None:
    model = _relu_net()
    x, y = _regression_data(10, 14)
    state = torch.random.get_rng_state()
    a = average_case_sharpness(model, F.mse_loss, (x, y), 0.3, generator=torch.Generator().manual_seed(7))
    b = average_case_sharpness(model, F.mse_loss, (x, y), 0.3, generator=torch.Generator().manual_seed(7))
    c = average_case_sharpness(model, F.mse_loss, (x, y), 0.3, generator=torch.Generator().manual_seed(8))
    assert a == b and a.value != c.value
    assert average_case_sharpness(model, F.mse_loss, (x, y), 0.3) == average_case_sharpness(
        model, F.mse_loss, (x, y), 0.3, generator=torch.Generator().manual_seed(0)
    )
    r1 = worst_case_sharpness(
        model, F.mse_loss, (x, y), 0.3, random_start=True, generator=torch.Generator().manual_seed(7)
    )
    r2 = worst_case_sharpness(
        model, F.mse_loss, (x, y), 0.3, random_start=True, generator=torch.Generator().manual_seed(7)
    )
    assert r1 == r2
    m1 = m_sharpness(model, F.mse_loss, x, y, 5, 0.3, kind="average", generator=torch.Generator().manual_seed(3))
    m2 = m_sharpness(model, F.mse_loss, x, y, 5, 0.3, kind="average", generator=torch.Generator().manual_seed(3))
    assert m1 == m2
    assert torch.equal(torch.random.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------- arguments


def test_bad_arguments_name_the_argument() -> None:
    model = _relu_net()
    x, y = _regression_data(6, 15)
    data = (x, y)
    cases = [
        ("rho", lambda: worst_case_sharpness(model, F.mse_loss, data, -0.1)),
        ("rho", lambda: worst_case_sharpness(model, F.mse_loss, data, math.nan)),
        ("rho", lambda: average_case_sharpness(model, F.mse_loss, data, -1.0)),
        ("rho", lambda: m_sharpness(model, F.mse_loss, x, y, 2, -1.0)),
        ("p", lambda: worst_case_sharpness(model, F.mse_loss, data, 0.1, p=1)),
        ("p", lambda: worst_case_sharpness(model, F.mse_loss, data, 0.1, p=3)),
        ("steps", lambda: worst_case_sharpness(model, F.mse_loss, data, 0.1, steps=0)),
        ("step_size", lambda: worst_case_sharpness(model, F.mse_loss, data, 0.1, step_size=0.0)),
        ("eta", lambda: worst_case_sharpness(model, F.mse_loss, data, 0.1, adaptive=True, eta=-1.0)),
        ("mode", lambda: worst_case_sharpness(model, F.mse_loss, data, 0.1, mode="test")),
        ("num_probes", lambda: average_case_sharpness(model, F.mse_loss, data, 0.1, num_probes=0)),
        ("distribution", lambda: average_case_sharpness(model, F.mse_loss, data, 0.1, distribution="uniform")),
        ("m", lambda: m_sharpness(model, F.mse_loss, x, y, 0, 0.1)),
        ("m", lambda: m_sharpness(model, F.mse_loss, x, y, 7, 0.1)),
        ("m", lambda: m_sharpness(model, F.mse_loss, x, y, 2.0, 0.1)),
        ("kind", lambda: m_sharpness(model, F.mse_loss, x, y, 2, 0.1, kind="best")),
        ("batch", lambda: worst_case_sharpness(model, F.mse_loss, x, 0.1)),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            call()
    with pytest.raises(ValueError, match="not finite"):
        worst_case_sharpness(model, lambda out, t: F.mse_loss(out, t) * math.inf, data, 0.1)
