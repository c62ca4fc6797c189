"""Weights are never left perturbed: exact (bitwise) restore, restore on exceptions, BN statistics, checkpoints."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from sharpness import SAM, frozen_bn


def _mlp(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)


def _data(dtype: torch.dtype = torch.float32, n: int = 32, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen).to(dtype), torch.randint(0, 4, (n,), generator=gen)


def _backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    return loss


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_bitwise(model: nn.Module, expected: list[torch.Tensor]) -> None:
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p.detach(), e)


# ----------------------------------------------------------------------------- exact restore


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [2.0, float("inf")])
def test_restore_is_bitwise_exact(dtype: torch.dtype, p: float) -> None:
    model = _mlp(dtype)
    x, y = _data(dtype)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.37, p=p, lr=0.1)
    before = _weights(model)
    _backward(model, x, y)
    assert opt.first_step(zero_grad=True)
    assert opt.is_perturbed
    moved = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(moved, before, strict=True))
    _backward(model, x, y)
    opt.restore()
    assert not opt.is_perturbed
    _assert_bitwise(model, before)
    if dtype == torch.bfloat16:
        # Undoing by subtraction would not be exact here, so the test above can tell copy from subtraction.
        eps = [m - b for m, b in zip(moved, before, strict=True)]
        assert any(not torch.equal(m - e, b) for m, e, b in zip(moved, eps, before, strict=True))


def test_second_step_is_base_step_from_the_exact_original_weights() -> None:
    """After second_step: w = base_step(w_before, g_sam), bitwise equal to a plain SGD on a clone."""
    model, clone = _mlp(), _mlp()
    x, y = _data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    base = torch.optim.SGD(clone.parameters(), lr=0.1, momentum=0.9)
    _backward(model, x, y)
    opt.first_step(zero_grad=True)
    _backward(model, x, y)
    for q, p in zip(clone.parameters(), model.parameters(), strict=True):
        q.grad = p.grad.clone()
    opt.second_step()
    base.step()
    _assert_bitwise(model, _weights(clone))


def test_exception_inside_perturbed_block_restores() -> None:
    model = _mlp()
    x, y = _data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    before = _weights(model)
    _backward(model, x, y)
    with pytest.raises(KeyError), opt.perturbed():
        _backward(model, x, y)
        raise KeyError("boom")
    assert not opt.is_perturbed
    _assert_bitwise(model, before)


def test_exception_in_second_closure_call_restores_and_takes_no_step() -> None:
    model = _mlp()
    x, y = _data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    before = _weights(model)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("second pass failed")
        return _backward(model, x, y)

    with pytest.raises(RuntimeError, match="second pass failed"):
        opt.step(closure)
    _assert_bitwise(model, before)
    assert not opt.is_perturbed
    assert not opt.base_optimizer.state  # no momentum buffer: the base step was not taken
    opt.step(lambda: _backward(model, x, y))  # and the optimizer is usable afterwards
    assert opt.base_optimizer.state


def test_context_manager_then_second_step_equals_closure() -> None:
    a, b = _mlp(), _mlp()
    x, y = _data()
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    opt_a.step(lambda: _backward(a, x, y))
    _backward(b, x, y)
    with opt_b.perturbed() as applied:
        assert applied
        _backward(b, x, y)
    opt_b.second_step(zero_grad=True)
    _assert_bitwise(b, _weights(a))


# ----------------------------------------------------------------------------- batch norm


def _bn_model(momentum: float | None = 0.1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, momentum=momentum), nn.ReLU(), nn.Linear(8, 4))


def _bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("api", ["closure", "two-step"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_running_stats_come_from_the_first_pass_only(api: str, momentum: float | None) -> None:
    model, reference = _bn_model(momentum), _bn_model(momentum)
    x, y = _data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, model=model)
    reference(x)  # one forward pass in train mode: the statistics SAM must end with
    if api == "closure":
        opt.step(lambda: _backward(model, x, y))
    else:
        _backward(model, x, y)
        opt.first_step(zero_grad=True)
        _backward(model, x, y)
        assert int(model[1].num_batches_tracked) == 2  # the perturbed pass did run in train mode
        opt.second_step()
    for key, value in _bn_state(reference).items():
        assert torch.equal(_bn_state(model)[key], value), key


def test_without_model_the_second_pass_updates_bn() -> None:
    """The control: without ``model=`` the perturbed pass does move the statistics (so the test above bites)."""
    model, reference = _bn_model(), _bn_model()
    x, y = _data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    reference(x)
    opt.step(lambda: _backward(model, x, y))
    assert int(model[1].num_batches_tracked) == 2
    assert not torch.equal(model[1].running_mean, reference[1].running_mean)


def test_frozen_bn_context_covers_instance_norm_and_restores_on_error() -> None:
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.InstanceNorm1d(3, track_running_stats=True), nn.BatchNorm1d(3))
    x = torch.randn(4, 2, 10)
    model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError), frozen_bn(model):
        model(x + 1.0)
        raise ValueError
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(TypeError, match="nn.Module"), frozen_bn("not a model"):  # type: ignore[arg-type]
        pass


# ----------------------------------------------------------------------------- checkpoints


def _train(model: nn.Module, opt: SAM, sched, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        opt.step(lambda: _backward(model, x, y))
        sched.step()


@pytest.mark.parametrize(
    "base, kwargs",
    [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)), (torch.optim.AdamW, dict(lr=0.01))],
)
def test_resume_from_checkpoint_is_bit_identical(base, kwargs) -> None:
    def make():
        model = _bn_model()
        opt = SAM(model.parameters(), base, rho=0.05, model=model, **kwargs)
        return model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)

    model, opt, sched = make()
    _train(model, opt, sched, 5, seed=0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    _train(model, opt, sched, 5, seed=1)

    resumed_model, resumed_opt, resumed_sched = make()
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    resumed_model.load_state_dict(ckpt["model"])
    resumed_opt.load_state_dict(ckpt["opt"])
    resumed_sched.load_state_dict(ckpt["sched"])
    _train(resumed_model, resumed_opt, resumed_sched, 5, seed=1)

    for key, value in model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    assert resumed_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_state_dict_holds_base_state_and_per_group_rho() -> None:
    model = _mlp()
    x, y = _data()
    opt = SAM(
        [{"params": model[0].parameters(), "sam_rho": 0.3}, {"params": model[2].parameters()}],
        torch.optim.SGD,
        rho=0.05,
        lr=0.1,
        momentum=0.9,
    )
    opt.step(lambda: _backward(model, x, y))
    state = opt.state_dict()
    assert [g["sam_rho"] for g in state["param_groups"]] == [0.3, 0.05]
    assert all("momentum_buffer" in s for s in state["state"].values())

    other = SAM(_mlp().parameters(), torch.optim.SGD, rho=0.9, lr=0.5, momentum=0.9)
    other_groups = [
        {"params": list(other.param_groups[0]["params"][:2])},
        {"params": other.param_groups[0]["params"][2:]},
    ]
    other = SAM(other_groups, torch.optim.SGD, rho=0.9, lr=0.5, momentum=0.9)
    other.load_state_dict(state)
    assert [g["sam_rho"] for g in other.param_groups] == [0.3, 0.05]
    assert other.param_groups is other.base_optimizer.param_groups
    assert other.state is other.base_optimizer.state


# ----------------------------------------------------------------------------- schedulers


def test_schedulers_work_on_either_object_and_see_no_spurious_warning() -> None:
    model = _mlp()
    x, y = _data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=1.0)
    on_sam = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    on_base = torch.optim.lr_scheduler.StepLR(opt.base_optimizer, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _backward(model, x, y)
        opt.first_step(zero_grad=True)
        _backward(model, x, y)
        opt.second_step(zero_grad=True)
        on_sam.step()
        on_base.step()
    assert opt.param_groups[0]["lr"] == opt.base_optimizer.param_groups[0]["lr"] == 0.25


def test_deepcopy_gives_a_working_independent_optimizer() -> None:
    import copy

    model = _mlp()
    x, y = _data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, model=model)
    opt.step(lambda: _backward(model, x, y))
    model_copy, opt_copy = copy.deepcopy((model, opt))
    assert opt_copy.param_groups is opt_copy.base_optimizer.param_groups
    assert opt_copy.param_groups[0]["params"][0] is next(model_copy.parameters())
    opt.step(lambda: _backward(model, x, y))
    opt_copy.step(lambda: _backward(model_copy, x, y))
    _assert_bitwise(model_copy, _weights(model))


def test_skipped_step_with_scaler_tolerates_non_contiguous_gradients() -> None:
    weight = nn.Parameter(torch.ones(4, 3))
    opt = SAM([weight], torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.tensor(1.0))  # initialises the scale, as scaling the loss would
    weight.grad = torch.full((3, 4), float("inf")).t()  # a transposed, non-contiguous gradient
    assert not weight.grad.is_contiguous()
    assert not opt.first_step(scaler=scaler)
    opt.second_step(scaler=scaler)
    scaler.update()
    assert torch.equal(weight.detach(), torch.ones(4, 3))
    assert scaler.get_scale() == 2.0**15
