"""The preconditioned sharpness: P from the optimizer's state reproduces its step; P^{-1/2} H P^{-1/2} against dense."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sharpness import MSAM, SAM
from sharpness.curvature import HessianOperator, top_eigenvalues
from sharpness.curvature.preconditioned import PreconditionedOperator, adaptive_preconditioner

F = nn.functional


def _problem(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    gen = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(30, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (30,), generator=gen)
    return model, (x, y)


def _step(model: nn.Module, opt: torch.optim.Optimizer, data) -> None:
    opt.zero_grad()
    F.cross_entropy(model(data[0]), data[1]).backward()
    opt.step()


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.parametrize(
    "build, key",
    [
        (lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.95), eps=1e-3), "exp_avg"),
        (lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.0), "exp_avg"),
        (lambda ps: torch.optim.Adam(ps, lr=0.01, amsgrad=True, eps=1e-4), "exp_avg"),
        (lambda ps: torch.optim.RMSprop(ps, lr=0.01, eps=1e-3), None),
        (lambda ps: torch.optim.RMSprop(ps, lr=0.01, centered=True, eps=1e-3), None),
        (lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.7), "momentum_buffer"),
    ],
)
def test_the_preconditioner_reproduces_the_optimizer_step(build, key) -> None:
    """After step t, ``w_t − w_{t−1} = −η P_t⁻¹ u_t`` with P from the state and u Adam's m (RMSprop: the gradient;
    with momentum, ``b_t − μ b_{t−1} = P_t⁻¹ g_t``): P is the optimizer's own denominator, bias corrections included."""
    model, data = _problem()
    params = list(model.parameters())
    opt = build(params)
    for _ in range(3):
        _step(model, opt, data)
    before = _flat(p.detach().clone() for p in params)
    buffer_before = _flat(opt.state[p][key].clone() for p in params) if key == "momentum_buffer" else None
    _step(model, opt, data)
    precond = adaptive_preconditioner(opt, params)
    delta = _flat(p.detach() for p in params) - before
    grad = _flat(p.grad for p in params)
    if key == "exp_avg":
        expected = -0.01 * _flat(opt.state[p]["exp_avg"] for p in params) / precond
    elif key == "momentum_buffer":
        buffer = _flat(opt.state[p]["momentum_buffer"] for p in params)
        torch.testing.assert_close(buffer - 0.7 * buffer_before, grad / precond, rtol=1e-10, atol=1e-14)
        expected = -0.01 * buffer
    else:
        expected = -0.01 * grad / precond
    torch.testing.assert_close(delta, expected, rtol=1e-9, atol=1e-15)


def test_no_preconditioner_for_sgd_or_before_the_first_step_and_none_for_unstepped_parameters() -> None:
    model, data = _problem()
    params = list(model.parameters())
    assert adaptive_preconditioner(torch.optim.SGD(params, lr=0.1, momentum=0.9), params) is None
    adam = torch.optim.Adam(params, lr=0.01)
    assert adaptive_preconditioner(adam, params) is None
    params[-1].requires_grad_(False)  # the last bias is frozen: Adam never steps it
    _step(model, adam, data)
    precond = adaptive_preconditioner(adam, params)
    assert precond is not None and bool(torch.isinf(precond[-3:]).all()) and bool(torch.isfinite(precond[:-3]).all())


def test_sam_and_msam_around_adam_use_the_base_optimizers_state() -> None:
    model, data = _problem()
    params = list(model.parameters())
    sam = SAM(params, torch.optim.Adam, rho=0.05, lr=0.01)

    def closure() -> torch.Tensor:
        loss = F.cross_entropy(model(data[0]), data[1])
        loss.backward()
        return loss

    for _ in range(2):
        sam.step(closure)
    torch.testing.assert_close(
        adaptive_preconditioner(sam, params), adaptive_preconditioner(sam.base_optimizer, params)
    )
    msam = MSAM(params, "adamw", rho=0.1, lr=0.01)
    _step(model, msam, data)
    with msam.unperturbed():
        expected = _flat((msam.state[p]["exp_avg_sq"] / 0.001).sqrt() + 1e-8 for p in params) * 0.1
        torch.testing.assert_close(adaptive_preconditioner(msam, params), expected)


def _dense(op) -> torch.Tensor:
    return torch.stack([op.matvec(e) for e in torch.eye(op.dim, dtype=torch.float64)])


def test_the_operator_is_the_dense_p_half_h_p_half_with_the_eigenvalues_of_p_inverse_h() -> None:
    model, data = _problem()
    op = HessianOperator(model, F.cross_entropy, data)
    hessian = _dense(op)
    precond = torch.rand(op.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 5 + 0.05
    scale = precond.rsqrt()
    expected = scale[:, None] * hessian * scale[None, :]
    pre = PreconditionedOperator(op, precond)
    torch.testing.assert_close(_dense(pre), expected, rtol=1e-10, atol=1e-12)
    assert pre.num_matvecs == op.dim
    eig = np.linalg.eigvals((hessian / precond[:, None]).numpy())  # P⁻¹H, not symmetric
    assert np.abs(eig.imag).max() < 1e-8
    top = top_eigenvalues(pre, k=2, tol=1e-10)
    np.testing.assert_allclose(top.eigenvalues.numpy(), np.sort(eig.real)[::-1][:2], rtol=1e-7)
    raw_top = torch.linalg.eigvalsh(hessian)[-1].item()
    assert abs(top.eigenvalues[0].item() - raw_top) > 0.1 * raw_top  # P changes the answer: not a vacuous test


def test_infinite_entries_drop_coordinates_and_bad_diagonals_are_refused() -> None:
    model, data = _problem()
    op = HessianOperator(model, F.cross_entropy, data)
    precond = torch.ones(op.dim, dtype=torch.float64)
    precond[:10] = torch.inf
    dense = _dense(PreconditionedOperator(op, precond))
    assert bool((dense[:10] == 0).all()) and bool((dense[:, :10] == 0).all())
    with pytest.raises(ValueError, match="flat"):
        PreconditionedOperator(op, torch.ones(op.dim + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="> 0"):
        PreconditionedOperator(op, torch.zeros(op.dim, dtype=torch.float64))
