"""Gradient accumulation, bf16 autocast and fp16 GradScaler paths of SAM."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpness import SAM


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 4)).to(dtype)


def _data(n: int = 32, dtype: torch.dtype = torch.float32, seed: int = 1):
    """Inputs and learnable labels (the argmax of a fixed random linear teacher)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    teacher = torch.randn(6, 4, generator=torch.Generator().manual_seed(99))
    return x.to(dtype), (x @ teacher).argmax(1)


def _train_sam(model: nn.Module, x, y, steps: int = 30, autocast: torch.dtype | None = None) -> list[float]:
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.2, momentum=0.9)

    def closure():
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = _loss(model, x, y)
        loss.backward()
        return loss

    return [opt.step(closure).item() for _ in range(steps)]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x).float(), y)


def test_gradient_accumulation_matches_one_large_batch() -> None:
    """4 micro-batches of 8 (loss/4 each, accumulated in both passes) = one batch of 32, in float64."""
    big, accumulated = _mlp(torch.float64), _mlp(torch.float64)
    opt_big = SAM(big.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt_acc = SAM(accumulated.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    for step in range(3):
        x, y = _data(dtype=torch.float64, seed=step)

        def closure():
            loss = _loss(big, x, y)
            loss.backward()
            return loss

        opt_big.step(closure)

        def accumulate() -> None:
            for xs, ys in zip(x.chunk(4), y.chunk(4), strict=True):
                (_loss(accumulated, xs, ys) / 4).backward()

        accumulate()
        opt_acc.first_step(zero_grad=True)
        accumulate()
        opt_acc.second_step(zero_grad=True)
    for a, b in zip(big.parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_bf16_autocast_trains_like_fp32() -> None:
    x, y = _data(128)
    fp32 = _train_sam(_mlp(), x, y)
    bf16 = _train_sam(_mlp(), x, y, autocast=torch.bfloat16)
    assert bf16[-1] < 0.5 * bf16[0]
    assert abs(bf16[-1] - fp32[-1]) < 0.05


def _scaler_step(model: nn.Module, opt: SAM, scaler: torch.amp.GradScaler, x, y, fp16: bool = False):
    """The documented fp16 pattern (docs/sam.md)."""

    def forward():
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            return _loss(model, x, y)

    scaler.scale(forward()).backward()
    if opt.first_step(zero_grad=True, scaler=scaler):
        scaler.scale(forward()).backward()
    opt.second_step(zero_grad=True, scaler=scaler)
    scaler.update()


def test_grad_scaler_inf_first_gradient_skips_the_whole_step() -> None:
    model = _mlp()
    x, y = _data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # the scaled gradient overflows
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(1e6 * _loss(model, x, y)).backward()
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters())
    grads = [p.grad.clone() for p in model.parameters()]
    assert not opt.first_step(zero_grad=True, scaler=scaler)
    assert not opt.is_perturbed
    for p, b, g in zip(model.parameters(), before, grads, strict=True):
        assert torch.equal(p.detach(), b)
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)  # gradients untouched too
    opt.second_step(zero_grad=True, scaler=scaler)
    scaler.update()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)
    assert not opt.base_optimizer.state  # no momentum buffer: the base optimizer never stepped
    assert scaler.get_scale() == 2.0**126  # the scaler saw the overflow and backed off


def test_non_finite_gradient_without_scaler_skips_the_step() -> None:
    model = _mlp()
    x, y = _data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    x = x.clone()
    x[0, 0] = float("nan")

    def closure():
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.isnan(loss)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)
    assert not opt.base_optimizer.state


def test_grad_scaler_path_equals_unscaled_sam() -> None:
    """A power-of-two loss scale is exact, so the scaled path must give the unscaled SAM trajectory."""
    scaled, plain = _mlp(), _mlp()
    options = dict(rho=0.1, lr=0.1, momentum=0.9, weight_decay=1e-2, include_weight_decay=True)
    opt_s = SAM(scaled.parameters(), torch.optim.SGD, **options)
    opt_p = SAM(plain.parameters(), torch.optim.SGD, **options)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    for step in range(4):
        x, y = _data(seed=step)
        _scaler_step(scaled, opt_s, scaler, x, y)

        def closure():
            loss = _loss(plain, x, y)
            loss.backward()
            return loss

        opt_p.step(closure)
    for a, b in zip(scaled.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_fp16_autocast_with_grad_scaler_trains_like_fp32() -> None:
    x, y = _data(128)
    fp32 = _train_sam(_mlp(), x, y)
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.2, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    first = _loss(model, x, y).item()
    for _ in range(30):
        _scaler_step(model, opt, scaler, x, y, fp16=True)
    last = _loss(model, x, y).item()
    assert last < 0.5 * first
    assert abs(last - fp32[-1]) < 0.1  # fp32's list holds losses before each step: the last is one step behind


@pytest.mark.parametrize("max_norm", [1e-3, 10.0])
def test_clipping_the_first_gradient_does_not_change_the_l2_perturbation(max_norm: float) -> None:
    """Global-norm clipping only rescales g, and ε̂ = ρ g/||g|| is scale-invariant (documented in docs/sam.md)."""
    model = _mlp(torch.float64)
    x, y = _data(dtype=torch.float64)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, x, y).backward()
    opt.first_step()
    unclipped = [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]
    opt.restore()
    nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.first_step()
    for p, b, e in zip(model.parameters(), before, unclipped, strict=True):
        torch.testing.assert_close(p.detach() - b, e, rtol=1e-10, atol=1e-14)
    opt.restore()
