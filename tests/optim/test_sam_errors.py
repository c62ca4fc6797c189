"""Bad input gets a clear error, or a defined behaviour that these tests pin down."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sharpness import SAM


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))


def _backward(model: nn.Module) -> None:
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    model(x).pow(2).mean().backward()


@pytest.mark.parametrize("rho", [-0.1, math.nan, math.inf, "0.1", True])
def test_bad_rho(rho) -> None:
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        SAM(_mlp().parameters(), torch.optim.SGD, rho=rho, lr=0.1)


@pytest.mark.parametrize("p", [0.5, 0.0, -2.0, math.nan])
def test_p_below_one_is_not_a_norm(p: float) -> None:
    with pytest.raises(ValueError, match="p must be a number >= 1"):
        SAM(_mlp().parameters(), torch.optim.SGD, p=p, lr=0.1)


def test_bad_eta_scope_and_flags() -> None:
    params = list(_mlp().parameters())
    with pytest.raises(ValueError, match="eta"):
        SAM(params, torch.optim.SGD, adaptive=True, eta=-1.0, lr=0.1)
    with pytest.raises(ValueError, match="adaptive_scope"):
        SAM(params, torch.optim.SGD, adaptive=True, adaptive_scope="biases", lr=0.1)
    with pytest.raises(TypeError, match="adaptive must be True or False"):
        SAM(params, torch.optim.SGD, adaptive="yes", lr=0.1)


def test_rho_edited_in_a_group_is_checked_at_the_next_step() -> None:
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    opt.param_groups[0]["sam_rho"] = -1.0
    _backward(model)
    with pytest.raises(ValueError, match="rho"):
        opt.first_step()


def test_groups_with_different_p_are_rejected() -> None:
    model = _mlp()
    opt = SAM(
        [{"params": model[0].parameters(), "sam_p": 2.0}, {"params": model[2].parameters(), "sam_p": math.inf}],
        torch.optim.SGD,
        lr=0.1,
    )
    _backward(model)
    with pytest.raises(ValueError, match="same p"):
        opt.first_step()


def test_closure_returning_none() -> None:
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="closure returned None in its first"):
        opt.step(lambda: _backward(model))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_closure_returning_none_in_second_call_restores() -> None:
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        _backward(model)
        return torch.tensor(1.0) if len(calls) == 1 else None

    with pytest.raises(TypeError, match="second"):
        opt.step(closure)
    assert not opt.is_perturbed
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_closure_without_backward() -> None:
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="must call loss.backward"):
        opt.step(lambda: model(torch.randn(2, 3)).sum())


def test_step_without_closure_and_out_of_order_calls() -> None:
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        opt.first_step()
    _backward(model)
    opt.first_step()
    with pytest.raises(RuntimeError, match="already perturbed"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.state_dict()
    opt.second_step()
    opt.state_dict()


def test_sparse_gradients_are_rejected() -> None:
    emb = nn.Embedding(10, 4, sparse=True)
    opt = SAM(emb.parameters(), torch.optim.SGD, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.first_step()


def test_parameters_without_gradients_are_left_alone() -> None:
    """An unused layer has no gradient: it is neither perturbed nor in the norm, and the base skips it."""
    model = _mlp()
    unused = nn.Linear(4, 4)
    opt = SAM(list(model.parameters()) + list(unused.parameters()), torch.optim.SGD, rho=0.3, lr=0.1)
    alone = _mlp()
    opt_alone = SAM(alone.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    unused_before = [p.detach().clone() for p in unused.parameters()]
    for o, m in ((opt, model), (opt_alone, alone)):
        _backward(m)
        o.first_step()
        assert all(p.grad is None for p in unused.parameters())
        assert all(torch.equal(p, b) for p, b in zip(unused.parameters(), unused_before, strict=True))
        o.second_step()
    assert all(torch.equal(p, b) for p, b in zip(unused.parameters(), unused_before, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), alone.parameters(), strict=True))


def test_parameters_on_several_devices_are_rejected() -> None:
    on_cpu = nn.Parameter(torch.ones(3))
    on_meta = nn.Parameter(torch.ones(3, device="meta"))
    opt = SAM([on_cpu, on_meta], torch.optim.SGD, lr=0.1)
    on_cpu.grad = torch.ones(3)
    on_meta.grad = torch.ones(3, device="meta")
    with pytest.raises(ValueError, match="several devices"):
        opt.first_step()
    assert not opt.is_perturbed


@pytest.mark.parametrize("p", [2.0, math.inf, 1.0, 3.0])
@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradient_means_no_perturbation_and_no_nan(p: float, adaptive: bool) -> None:
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, p=p, adaptive=adaptive, lr=0.1, momentum=0.9)
    before = [q.detach().clone() for q in model.parameters()]
    for q in model.parameters():
        q.grad = torch.zeros_like(q)
    assert opt.first_step()
    assert opt.last_grad_norm == 0.0
    assert all(torch.equal(q, b) for q, b in zip(model.parameters(), before, strict=True))
    opt.second_step()
    assert all(torch.isfinite(q).all() and torch.equal(q, b) for q, b in zip(model.parameters(), before, strict=True))


def test_base_optimizer_arguments() -> None:
    params = list(_mlp().parameters())
    built = torch.optim.SGD(params, lr=0.1)
    with pytest.raises(TypeError, match="already-built optimizer"):
        SAM(None, built, lr=0.2)
    with pytest.raises(ValueError, match="parameters of the given base optimizer"):
        SAM(list(_mlp().parameters()), built)
    with pytest.raises(TypeError, match="optimizer class"):
        SAM(params, "sgd")
    with pytest.raises(TypeError, match="must build a torch.optim.Optimizer"):
        SAM(params, lambda groups, **kw: object())
    with pytest.raises(TypeError, match="params is required"):
        SAM(None, torch.optim.SGD, lr=0.1)
    assert SAM(params, built).base_optimizer is built


def test_load_state_dict_rejects_foreign_dicts() -> None:
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="not a sharpness.SAM state dict"):
        opt.load_state_dict({"model": {}})


def test_a_plain_optimizer_state_dict_loads_the_base_state_with_a_warning() -> None:
    """torch's layout without SAM's entry (what torch.distributed.checkpoint hands back): base state only."""
    model = _mlp()
    plain = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    _backward(model)
    plain.step()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning, match="no SAM state"):
        opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["lr"] == 0.3 and opt.param_groups[0]["sam_rho"] == 0.2
    assert all("momentum_buffer" in s for s in opt.state.values()) and opt.steps == 0


def test_add_param_group_reaches_the_base_optimizer_with_sam_defaults() -> None:
    model, extra = _mlp(), nn.Linear(2, 2)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.07, lr=0.1, momentum=0.9)
    opt.add_param_group({"params": extra.parameters(), "lr": 0.01})
    group = opt.base_optimizer.param_groups[-1]
    assert group["sam_rho"] == 0.07 and group["lr"] == 0.01 and group["momentum"] == 0.9
    assert opt.param_groups is opt.base_optimizer.param_groups
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": nn.Linear(2, 2).parameters(), "sam_rho": -1})
