"""SAM on a CUDA device: run with ``pytest -m cuda`` on a machine with a GPU (deselected by ``make test``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpness import SAM

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _model(device: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4)).to(device, dtype)


def _data(device: str, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=gen)
    return x.to(device, dtype), (x @ torch.randn(8, 4, generator=gen)).argmax(1).to(device)


def _closure(model, x, y, autocast_dtype=None):
    def closure():
        with torch.autocast("cuda", dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restore_is_bitwise_exact_on_cuda(dtype: torch.dtype) -> None:
    model = _model("cuda", dtype)
    x, y = _data("cuda", dtype)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, model=model)
    before = [p.detach().clone() for p in model.parameters()]
    _closure(model, x, y)()
    opt.first_step(zero_grad=True)
    _closure(model, x, y)()
    opt.restore()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("adaptive", [False, True])
def test_cuda_matches_cpu(adaptive: bool) -> None:
    models = {dev: _model(dev, torch.float64) for dev in ("cpu", "cuda")}
    opts = {
        dev: SAM(m.parameters(), torch.optim.SGD, rho=0.1, adaptive=adaptive, lr=0.1, momentum=0.9, model=m)
        for dev, m in models.items()
    }
    for _ in range(5):
        for dev, model in models.items():
            x, y = _data(dev, torch.float64)
            opts[dev].step(_closure(model, x, y))
    for p_cpu, p_cuda in zip(models["cpu"].parameters(), models["cuda"].parameters(), strict=True):
        torch.testing.assert_close(p_cuda.cpu(), p_cpu, rtol=1e-9, atol=1e-11)


def test_fp16_grad_scaler_on_cuda_trains() -> None:
    model = _model("cuda")
    x, y = _data("cuda")
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.2, momentum=0.9, model=model)
    scaler = torch.amp.GradScaler("cuda")
    first = nn.functional.cross_entropy(model(x), y).item()
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if opt.first_step(zero_grad=True, scaler=scaler):
            with torch.autocast("cuda", dtype=torch.float16):
                loss2 = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss2).backward()
        opt.second_step(zero_grad=True, scaler=scaler)
        scaler.update()
    assert nn.functional.cross_entropy(model(x), y).item() < 0.5 * first


def test_bf16_autocast_on_cuda_trains() -> None:
    model = _model("cuda")
    x, y = _data("cuda")
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.2, momentum=0.9, model=model)
    losses = [opt.step(_closure(model, x, y, torch.bfloat16)).item() for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]


def test_parameters_on_cpu_and_cuda_are_rejected() -> None:
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2, device="cuda"))
    opt = SAM([a, b], torch.optim.SGD, lr=0.1)
    a.grad, b.grad = torch.ones(2), torch.ones(2, device="cuda")
    with pytest.raises(ValueError, match="several devices"):
        opt.first_step()
