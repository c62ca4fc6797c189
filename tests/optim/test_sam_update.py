"""The SAM update equals the formula: quadratics in closed form, a small MLP against plain autograd."""

from __future__ import annotations

import math

import pytest
import torch
from sam_reference import lp_perturbation, sam_gradient
from torch import nn
from torch.func import functional_call

from sharpness import SAM


@pytest.fixture(autouse=True)
def _float64():
    """Everything in float64, so the comparisons can be tight."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _closure(loss_fn):
    def closure():
        loss = loss_fn()
        loss.backward()
        return loss

    return closure


# ----------------------------------------------------------------------------- quadratic, closed form


def _quadratic(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=gen))[0]
    a = q @ torch.diag(torch.linspace(0.1, 3.0, n)) @ q.T
    return a, torch.randn(n, generator=gen)


@pytest.mark.parametrize("p", [2.0, math.inf, 3.0, 1.5, 1.0])
def test_quadratic_sgd_momentum_matches_closed_form(p: float) -> None:
    """L(w) = ½wᵀAw − bᵀw: ∇L(w + ε) = A(w + ε) − b, SGD momentum recursion written out by hand."""
    a, b = _quadratic()
    rho, lr, mu = 0.2, 0.05, 0.9
    w = nn.Parameter(torch.linspace(-1, 1, 6))
    opt = SAM([w], torch.optim.SGD, rho=rho, p=p, lr=lr, momentum=mu)
    w_ref, buf = w.detach().clone(), None
    for _ in range(5):
        opt.step(_closure(lambda: 0.5 * w @ a @ w - b @ w))
        g = a @ w_ref - b
        g_sam = a @ (w_ref + lp_perturbation(g, rho, p)) - b
        buf = g_sam.clone() if buf is None else mu * buf + g_sam
        w_ref = w_ref - lr * buf
        torch.testing.assert_close(w.detach(), w_ref, rtol=1e-12, atol=1e-12)


def test_quadratic_adam_asam_matches_closed_form() -> None:
    """ASAM on a matrix parameter: ε = ρ T²g/||Tg||, T = |w| + η; Adam written out by hand."""
    a, b = _quadratic(4)
    rho, eta, lr, (b1, b2), adam_eps = 0.5, 0.01, 0.01, (0.9, 0.999), 1e-8
    w = nn.Parameter(torch.tensor([[0.5, -1.0], [2.0, 0.1]]))
    opt = SAM([w], torch.optim.Adam, rho=rho, adaptive=True, eta=eta, lr=lr, betas=(b1, b2), eps=adam_eps)
    w_ref, m, v = w.detach().clone().reshape(-1), torch.zeros(4), torch.zeros(4)
    for t in range(1, 6):
        opt.step(_closure(lambda: 0.5 * w.reshape(-1) @ a @ w.reshape(-1) - b @ w.reshape(-1)))
        g = a @ w_ref - b
        t_w = w_ref.abs() + eta
        g_sam = a @ (w_ref + rho * t_w**2 * g / (t_w * g).norm()) - b
        m, v = b1 * m + (1 - b1) * g_sam, b2 * v + (1 - b2) * g_sam**2
        w_ref = w_ref - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + adam_eps)
        torch.testing.assert_close(w.detach().reshape(-1), w_ref, rtol=1e-12, atol=1e-12)


def test_perturbation_lies_on_the_sphere_and_maximises_the_linear_model() -> None:
    """||ε̂||_p = ρ and <g, ε̂> = ρ||g||_q; no random ε on the sphere does better (the dual-norm optimum)."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(50))
    g = torch.randn(50)
    for p in (1.0, 1.5, 2.0, 4.0, math.inf):
        opt = SAM([w], torch.optim.SGD, rho=0.3, p=p, lr=0.1)
        w.grad = g.clone()
        before = w.detach().clone()
        opt.first_step()
        eps = w.detach() - before
        opt.restore()
        q = math.inf if p == 1 else 1.0 if math.isinf(p) else p / (p - 1)
        assert eps.norm(p).item() == pytest.approx(0.3, rel=1e-9)
        assert (g @ eps).item() == pytest.approx(0.3 * g.norm(q).item(), rel=1e-9)
        assert opt.last_grad_norm == pytest.approx(g.norm(q).item(), rel=1e-12)
        random = torch.randn(1000, 50)
        random = 0.3 * random / random.norm(p, dim=1, keepdim=True)
        assert (random @ g).max().item() <= (g @ eps).item() + 1e-12


# ----------------------------------------------------------------------------- small MLP vs autograd


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(32, 5, generator=gen), torch.randint(0, 3, (32,), generator=gen)


BASES = {
    "sgd-momentum": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adam": (torch.optim.Adam, dict(lr=0.01, weight_decay=1e-3)),
}
CASES = {
    "p2": dict(p=2.0),
    "pinf": dict(p=math.inf),
    "p3": dict(p=3.0),
    "p1": dict(p=1.0),
    "asam-weights": dict(adaptive=True),
    "asam-all": dict(adaptive=True, adaptive_scope="all"),
    "include-weight-decay": dict(include_weight_decay=True),
}


@pytest.mark.parametrize("base_name", BASES)
@pytest.mark.parametrize("case", CASES)
def test_mlp_matches_autograd_reference(base_name: str, case: str) -> None:
    """Three SAM steps with two parameter groups (ρ = 0.05 and 0.2) against the plain reference + torch base."""
    base_cls, base_kwargs = BASES[base_name]
    options = CASES[case]
    model, ref_model = _mlp(), _mlp()
    x, y = _batch()
    names = [n for n, _ in model.named_parameters()]
    rhos = [0.05 if n.startswith("0.") else 0.2 for n in names]

    def groups(m: nn.Module) -> list[dict]:
        params = list(m.parameters())
        return [
            {"params": [q for q, r in zip(params, rhos, strict=True) if r == 0.05], "sam_rho": 0.05},
            {"params": [q for q, r in zip(params, rhos, strict=True) if r == 0.2], "sam_rho": 0.2},
        ]

    opt = SAM(groups(model), base_cls, **options, **base_kwargs)
    ref_groups = groups(ref_model)
    ref_order = [q for g in ref_groups for q in g["params"]]
    ref_base = base_cls(ref_groups, **base_kwargs)
    ref_rho = [g["sam_rho"] for g in ref_groups for _ in g["params"]]

    name_of = {id(q): n for n, q in ref_model.named_parameters()}
    ref_names = [name_of[id(q)] for q in ref_order]

    def loss_of(weights: list[torch.Tensor]) -> torch.Tensor:
        by_name = dict(zip(ref_names, weights, strict=True))
        return nn.functional.cross_entropy(functional_call(ref_model, by_name, (x,)), y)

    adaptive = None
    if options.get("adaptive"):
        adaptive = [options.get("adaptive_scope") == "all" or q.ndim >= 2 for q in ref_order]
    weight_decay = [base_kwargs["weight_decay"]] * len(ref_order) if options.get("include_weight_decay") else None

    for _ in range(3):
        opt.step(lambda: _loss_backward(model, x, y))
        _, g_sam = sam_gradient(loss_of, ref_order, ref_rho, options.get("p", 2.0), adaptive, 0.01, weight_decay)
        for q, g in zip(ref_order, g_sam, strict=True):
            q.grad = g
        ref_base.step()
        for (name, q), q_ref in zip(model.named_parameters(), ref_model.parameters(), strict=True):
            torch.testing.assert_close(q.detach(), q_ref.detach(), rtol=1e-10, atol=1e-12, msg=name)


def _loss_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


def test_closure_returns_loss_at_unperturbed_weights() -> None:
    model = _mlp()
    x, y = _batch()
    expected = nn.functional.cross_entropy(model(x), y).item()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    assert opt.step(lambda: _loss_backward(model, x, y)).item() == expected


def test_two_step_api_equals_closure_api() -> None:
    x, y = _batch()
    a, b = _mlp(), _mlp()
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    for _ in range(3):
        opt_a.step(lambda: _loss_backward(a, x, y))
        _loss_backward(b, x, y)
        opt_b.first_step(zero_grad=True)
        _loss_backward(b, x, y)
        opt_b.second_step(zero_grad=True)
    for qa, qb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(qa, qb)


def test_built_base_instance_equals_base_class() -> None:
    x, y = _batch()
    a, b = _mlp(), _mlp()
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt_b = SAM(None, torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9), rho=0.1)
    for _ in range(3):
        opt_a.step(lambda: _loss_backward(a, x, y))
        opt_b.step(lambda: _loss_backward(b, x, y))
    for qa, qb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(qa, qb)


def test_rho_zero_is_the_base_optimizer() -> None:
    x, y = _batch()
    a, b = _mlp(), _mlp()
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt_a.step(lambda: _loss_backward(a, x, y))
        opt_b.zero_grad()
        _loss_backward(b, x, y)
        opt_b.step()
    for qa, qb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(qa, qb)
