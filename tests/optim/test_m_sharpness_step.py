"""m-SAM (SAM.step_micro_batches): one perturbation per micro-batch, against a plain autograd reference."""

from __future__ import annotations

import math

import pytest
import torch
from sam_reference import sam_gradient
from torch import nn

from sharpness import AESAM, SAM, LookSAM


def _problem(n: int = 12, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=generator)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    return model, x, y


def _closures(model: nn.Module, x: torch.Tensor, y: torch.Tensor, m: int) -> list:
    def closure_of(xs, ys):
        def closure():
            loss = nn.functional.cross_entropy(model(xs), ys)
            loss.backward()
            return loss

        return closure

    return [closure_of(xs, ys) for xs, ys in zip(x.split(m), y.split(m), strict=True)]


def _functional_loss(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor):
    names = [name for name, _ in model.named_parameters()]
    return lambda w: nn.functional.cross_entropy(
        torch.func.functional_call(model, dict(zip(names, w, strict=True)), (xs,)), ys
    )


@pytest.mark.parametrize("m, sized", [(4, False), (5, True), (1, False)])
def test_steps_equal_the_averaged_per_micro_batch_sam_gradient(m: int, sized: bool) -> None:
    """Two SGD-momentum steps: w <- w - lr * buf, buf = 0.9 buf + Σ_j a_j ∇L_j(w + ρ g_j/||g_j||)."""
    model, x, y = _problem()
    rho, lr = 0.2, 0.1
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, momentum=0.9)
    w = [p.detach().clone() for p in model.parameters()]
    buf = None
    pieces = list(zip(x.split(m), y.split(m), strict=True))
    sizes = [len(ys) for _, ys in pieces]
    shares = [s / sum(sizes) for s in sizes] if sized else [1 / len(pieces)] * len(pieces)
    for _ in range(2):
        losses = [float(_functional_loss(model, xs, ys)(w)) for xs, ys in pieces]
        grad = [torch.zeros_like(t) for t in w]
        for (xs, ys), share in zip(pieces, shares, strict=True):
            _, g_sam = sam_gradient(_functional_loss(model, xs, ys), w, [rho] * len(w))
            grad = [a + share * b for a, b in zip(grad, g_sam, strict=True)]
        buf = grad if buf is None else [0.9 * b + g for b, g in zip(buf, grad, strict=True)]
        w = [t - lr * b for t, b in zip(w, buf, strict=True)]
        loss = opt.step_micro_batches(_closures(model, x, y, m), weights=sizes if sized else None)
        assert float(loss) == pytest.approx(sum(s * v for s, v in zip(shares, losses, strict=True)), rel=1e-12)
    for param, expected in zip(model.parameters(), w, strict=True):
        torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-12)
    assert opt.statistics()["sam_steps"] == 2 and opt.statistics()["steps"] == 2


def test_one_micro_batch_is_plain_sam_bitwise() -> None:
    model_a, x, y = _problem()
    model_b, _, _ = _problem()
    opt_a = SAM(model_a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt_b = SAM(model_b.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    for _ in range(3):
        opt_a.step_micro_batches(_closures(model_a, x, y, len(y)))
        opt_b.step(_closures(model_b, x, y, len(y))[0])
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)


def test_micro_batches_differ_from_whole_batch_sam() -> None:
    """Control for the reference test: the per-micro-batch ε is not the whole batch's ε."""
    model_a, x, y = _problem()
    model_b, _, _ = _problem()
    SAM(model_a.parameters(), torch.optim.SGD, rho=0.5, lr=0.1).step_micro_batches(_closures(model_a, x, y, 3))
    SAM(model_b.parameters(), torch.optim.SGD, rho=0.5, lr=0.1).step(_closures(model_b, x, y, len(y))[0])
    assert not torch.allclose(model_a[0].weight, model_b[0].weight, rtol=1e-6, atol=1e-9)


def test_an_exception_in_a_perturbed_pass_restores_the_weights_and_takes_no_step() -> None:
    model, x, y = _problem()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    closures = _closures(model, x, y, 4)
    calls = 0
    inner = closures[1]

    def failing():
        nonlocal calls
        calls += 1
        if calls == 2:  # the second micro-batch's perturbed pass
            raise KeyboardInterrupt
        return inner()

    closures[1] = failing
    with pytest.raises(KeyboardInterrupt):
        opt.step_micro_batches(closures)
    assert not opt.is_perturbed and opt.steps == 0
    for param, saved in zip(model.parameters(), before, strict=True):
        assert torch.equal(param, saved)
    opt.step_micro_batches(_closures(model, x, y, 4))  # the next step works
    assert opt.steps == 1


def test_a_non_finite_micro_batch_gradient_skips_the_step() -> None:
    model, x, y = _problem()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    closures = _closures(model, x, y, 4)

    def poisoned():
        loss = nn.functional.cross_entropy(model(x[4:8]), y[4:8]) * math.inf
        loss.backward()
        return loss

    closures[1] = poisoned
    opt.step_micro_batches(closures)
    assert opt.steps == 0 and not opt.is_perturbed
    for param, saved in zip(model.parameters(), before, strict=True):
        assert torch.equal(param, saved)


def test_bad_arguments_are_named() -> None:
    model, x, y = _problem()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    with pytest.raises(ValueError, match="closures is empty"):
        opt.step_micro_batches([])
    with pytest.raises(ValueError, match="2 weights for 3 closures"):
        opt.step_micro_batches(_closures(model, x, y, 4), weights=[1, 2])
    with pytest.raises(ValueError, match="weights must be finite numbers >= 0"):
        opt.step_micro_batches(_closures(model, x, y, 4), weights=[1, -1, 2])
    for switching in (
        AESAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1),
        LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1),
    ):
        with pytest.raises(ValueError, match="always SAM steps"):
            switching.step_micro_batches(_closures(model, x, y, 4))
