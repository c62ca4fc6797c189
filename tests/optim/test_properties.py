"""Property-based tests of SAM's invariants over random shapes, dtypes, groups, ρ, p and gradient magnitudes.

- the restore is bitwise exact;
- ``||ε/ρ||_p = 1`` with per-group ρ (one group: ``||ε||_p = ρ``), and ε is exactly 0 where the ascent input is 0;
- finite gradients of any magnitude the dtype can hold give a finite ε;
- a state-dict round trip continues with bitwise identical steps, for every preset.

The number of examples comes from the hypothesis profile (``tests/conftest.py``): few for ``make test``, many
under ``CI=true``.
"""

from __future__ import annotations

import copy
import io
import math

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sharpness import AESAM, SAM, AELookSAM, LookSAM, PeriodicSAM, RandomSAM

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
PS = [1.0, 1.5, 2.0, 3.0, math.inf]


@st.composite
def setups(draw):
    """Parameter groups of random tensors (zero-size and gradient-less ones included) with random gradients."""
    dtype = draw(st.sampled_from(DTYPES))
    info = torch.finfo(dtype)
    exponent = draw(st.floats(math.log10(info.tiny) + 6, math.log10(info.max) - 3))  # |g| ~ 10^exponent
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for _ in range(draw(st.integers(1, 3))):
        params = []
        for shape in draw(st.lists(st.lists(st.integers(0, 4), max_size=3), min_size=1, max_size=3)):
            param = nn.Parameter(torch.zeros(shape, dtype=dtype))
            kind = draw(st.sampled_from(["dense", "sparse_zeros", "no_grad"]))
            if kind != "no_grad":
                grad = torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0**exponent
                if kind == "sparse_zeros":
                    grad = grad * (torch.rand(shape, generator=gen) < 0.5)
                param.grad = grad.to(dtype)
            params.append(param)
        groups.append({"params": params, "sam_rho": draw(st.floats(0.01, 2.0))})
    p = draw(st.sampled_from(PS))
    adaptive = draw(st.booleans()) and p == 2.0
    return groups, p, adaptive, dtype


def _has_gradient(groups) -> bool:
    return any(q.grad is not None and q.grad.count_nonzero() > 0 for g in groups for q in g["params"])


@given(setups())
def test_restore_is_bitwise_and_the_ball_is_respected(setup) -> None:
    groups, p, adaptive, dtype = setup
    params = [q for g in groups for q in g["params"]]
    for q in params:  # random weights for the restore check
        q.data.copy_(torch.randn(q.shape, dtype=torch.float64).to(dtype))
    before = [q.detach().clone() for q in params]
    opt = SAM(groups, torch.optim.SGD, p=p, adaptive=adaptive, lr=0.1)
    if not _has_gradient(groups):
        return
    assert opt.first_step()
    assert all(torch.isfinite(q).all() for q in params)
    opt.restore()
    assert all(torch.equal(q.detach(), b) for q, b in zip(params, before, strict=True))


@given(setups())
def test_perturbation_has_unit_norm_in_rho_units_and_zero_where_the_gradient_is(setup) -> None:
    groups, p, adaptive, dtype = setup
    opt = SAM(groups, torch.optim.SGD, p=p, adaptive=adaptive, eta=0.5, lr=0.1)
    if not _has_gradient(groups):
        return
    assert opt.first_step()  # weights are 0: ε is what they hold now (T_w = eta for ASAM)
    slices = []
    for group in groups:
        for q in group["params"]:
            if q.grad is None:
                assert q.count_nonzero() == 0
                continue
            eps = q.detach().double()
            assert torch.isfinite(eps).all()
            assert (eps[q.grad == 0] == 0).all()
            t_w = 0.5 if adaptive and q.ndim >= 2 else 1.0
            slices.append((eps / t_w / group["sam_rho"]).reshape(-1))
    norm = torch.linalg.vector_norm(torch.cat(slices), p).item()
    assert math.isclose(norm, 1.0, rel_tol=max(8 * torch.finfo(dtype).eps, 1e-12))


PRESETS = {
    "sam": lambda ps: SAM(ps, torch.optim.SGD, lr=0.05, momentum=0.9),
    "asam": lambda ps: SAM(ps, torch.optim.Adam, rho=0.5, adaptive=True, lr=0.01),
    "periodicsam": lambda ps: PeriodicSAM(ps, torch.optim.SGD, lr=0.05, k=2, nesterov=True, momentum=0.9),
    "randomsam": lambda ps: RandomSAM(ps, torch.optim.AdamW, lr=0.01, prob=0.5, seed=4),
    "looksam": lambda ps: LookSAM(ps, torch.optim.SGD, lr=0.05, k=2, alpha=0.5),
    "aesam": lambda ps: AESAM(ps, torch.optim.RMSprop, lr=0.01, total_steps=8),
    "aelooksam": lambda ps: AELookSAM(ps, torch.optim.Adadelta, lr=1.0, total_steps=8, alpha=0.5),
}


@given(st.sampled_from(sorted(PRESETS)), st.integers(0, 3), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_state_dict_round_trip_continues_identically(preset: str, before: int, after: int, seed: int) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    gen = torch.Generator().manual_seed(seed)
    batches = [
        (torch.randn(8, 3, generator=gen, dtype=torch.float64), torch.randn(8, 2, generator=gen, dtype=torch.float64))
        for _ in range(before + after)
    ]
    opt = PRESETS[preset](model.parameters())

    def train(m: nn.Module, o: SAM, data) -> None:
        for x, y in data:
            o.step(lambda: _mse_backward(m, x, y))

    train(model, opt, batches[:before])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    twin_model = copy.deepcopy(model)
    with torch.no_grad():
        for q in twin_model.parameters():
            q.add_(1.0)  # load_state_dict must overwrite these
    twin = PRESETS[preset](twin_model.parameters())
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin_model.load_state_dict(saved["model"])
    twin.load_state_dict(saved["opt"])
    train(model, opt, batches[before:])
    train(twin_model, twin, batches[before:])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters(), strict=True))
    assert (opt.steps, opt.sam_steps) == (twin.steps, twin.sam_steps)


def _mse_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss
