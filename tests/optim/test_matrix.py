"""The SAM family against an independent reference, in the style of torch's optimizer test matrix.

Axes: every preset × the three APIs (closure, two-step, context manager) × base optimizers {SGD, SGD-Nesterov,
Adam, AdamW, Adadelta, RMSprop} × ``maximize``, in float64 against the plain re-implementation in
``family_reference.py``; then each preset × API over dtypes {float32, float64, bfloat16, float16}, over tensor
kinds {non-contiguous, zero-size, requires_grad=False, complex}, with and without a ``GradScaler``, and under
``torch.compile``.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from family_reference import ReferenceRun, Spec
from torch import nn

from sharpness import AESAM, SAM, AELookSAM, LookSAM, PeriodicSAM, RandomSAM

STEPS = 5
TOTAL = 10

PRESETS = {
    "sam": (lambda ps, base: SAM(ps, base, rho=0.05), Spec()),
    "asam": (lambda ps, base: SAM(ps, base, rho=0.5, adaptive=True), Spec(rho=0.5, adaptive_asam=True)),
    "periodicsam": (lambda ps, base: PeriodicSAM(ps, base, k=2), Spec(policy="every_k", k=2)),
    "randomsam": (lambda ps, base: RandomSAM(ps, base, prob=0.5, seed=3), Spec(policy="bernoulli", seed=3)),
    "looksam": (lambda ps, base: LookSAM(ps, base, k=2, alpha=0.5), Spec(policy="every_k", k=2, alpha=0.5)),
    "aesam": (lambda ps, base: AESAM(ps, base, total_steps=TOTAL), Spec(policy="adaptive", total_steps=TOTAL)),
    "aelooksam": (
        lambda ps, base: AELookSAM(ps, base, total_steps=TOTAL, alpha=0.5),
        Spec(policy="adaptive", total_steps=TOTAL, alpha=0.5),
    ),
}
BASES = {
    "sgd": functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "nesterov": functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True),
    "adam": functools.partial(torch.optim.Adam, lr=0.01),
    "adamw": functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.01),
    "adadelta": functools.partial(torch.optim.Adadelta, lr=1.0),
    "rmsprop": functools.partial(torch.optim.RMSprop, lr=0.01),
}
APIS = ("closure", "two_step", "context")


def _model(dtype: torch.dtype = torch.float64, kind: str = "plain") -> nn.Module:
    return _Net(kind, dtype)


class _Net(nn.Module):
    """A two-layer net in ``dtype`` (same initial values in every dtype) with an extra parameter of ``kind``."""

    def __init__(self, kind: str, dtype: torch.dtype) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        draw = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
        self.kind = kind
        self.w1 = nn.Parameter((draw(5, 8) / 2).to(dtype))
        w2 = draw(3, 8).t() / 3 if kind == "noncontiguous" else draw(8, 3) / 3
        self.w2 = nn.Parameter(w2.to(dtype))
        self.b = nn.Parameter(torch.zeros(3, dtype=dtype))
        if kind == "zero_size":
            self.extra = nn.Parameter(torch.zeros(0, 3, dtype=dtype))
        elif kind == "frozen":
            self.extra = nn.Parameter(draw(3).to(dtype), requires_grad=False)
        elif kind == "complex":
            complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
            self.extra = nn.Parameter(torch.complex(draw(8), draw(8)).to(complex_dtype) / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ self.w1)
        if self.kind == "complex":
            h = (h * self.extra).real + h
        out = h @ self.w2 + self.b
        if self.kind == "zero_size":
            out = out + self.extra.sum(0)
        elif self.kind == "frozen":
            out = out + self.extra
        return out


def _batches(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(12, 5, generator=gen).to(dtype), torch.randint(0, 3, (12,), generator=gen)) for _ in range(STEPS)
    ]


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.float() if out.dtype in (torch.float16, torch.bfloat16) else out, y)


def _take_step(opt: SAM, model: nn.Module, x, y, api: str, scaler=None) -> None:
    def backward() -> torch.Tensor:
        loss = _loss(model(x), y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss

    if api == "closure":
        opt.step(backward)
        return
    backward()
    if not opt.wants_sam_step(scaler=scaler):
        opt.erm_step(zero_grad=True, scaler=scaler)
    elif api == "two_step":
        if opt.first_step(zero_grad=True, scaler=scaler):
            backward()
        opt.second_step(zero_grad=True, scaler=scaler)
    else:
        with opt.perturbed(scaler=scaler) as applied:
            if applied:
                backward()
        opt.second_step(zero_grad=True, scaler=scaler)
    if scaler is not None:
        scaler.update()


def _train(preset: str, base, api: str, dtype: torch.dtype = torch.float64, kind: str = "plain", scaler=None):
    model = _model(dtype, kind)
    reference = ReferenceRun(_model(torch.float64, kind), PRESETS[preset][1], base, _loss)
    params = [p for p in model.parameters() if p.requires_grad or kind == "frozen"]
    opt = PRESETS[preset][0](params, base)
    for x, y in _batches(dtype):
        _take_step(opt, model, x, y, api, scaler)
        reference.step(x, y)
    assert opt.sam_steps == reference.sam_steps and opt.steps == STEPS
    return model, reference.model


def _assert_close(model: nn.Module, reference: nn.Module, rtol: float, atol: float) -> None:
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        expected = q.detach().to(p.dtype) if not p.is_complex() else q.detach().to(p.dtype)
        torch.testing.assert_close(p.detach(), expected, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_matches_the_reference(preset: str, api: str, base: str, maximize: bool) -> None:
    model, reference = _train(preset, functools.partial(BASES[base], maximize=maximize), api)
    _assert_close(model, reference, rtol=1e-10, atol=1e-12)


TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 6e-2, torch.float16: 1e-2}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_dtypes(preset: str, api: str, dtype: torch.dtype) -> None:
    model, reference = _train(preset, BASES["sgd"], api, dtype)
    _assert_close(model, reference, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("kind", ["noncontiguous", "zero_size", "frozen", "complex"])
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_tensor_kinds(preset: str, api: str, kind: str) -> None:
    model, reference = _train(preset, BASES["adam"], api, torch.float64, kind)
    _assert_close(model, reference, rtol=1e-10, atol=1e-12)
    if kind == "noncontiguous":
        assert not model.w2.is_contiguous()


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("api", ["two_step", "context"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_grad_scaler_gives_the_unscaled_run(preset: str, api: str, base: str) -> None:
    """float32 with a GradScaler whose scale grows every step: the reference (unscaled) run, decisions included."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    model, reference = _train(preset, BASES[base], api, torch.float32, scaler=scaler)
    assert scaler.get_scale() == 2.0 ** (8 + STEPS)
    _assert_close(model, reference, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("what", ["train_step", "model"])
@pytest.mark.parametrize("preset", ["sam", "looksam", "aesam"])
def test_compiled_step_gives_the_eager_result(preset: str, what: str) -> None:
    """``torch.compile`` of a whole training step (SAM's step runs eagerly inside it) or of the model."""
    results = []
    for compiled in (False, True):
        model = _model(torch.float32)
        opt = PRESETS[preset][0](model.parameters(), BASES["sgd"])
        forward = torch.compile(model, backend="aot_eager") if compiled and what == "model" else model

        def train_step(x, y, forward=forward, opt=opt):
            return opt.step(lambda: _backward(forward, x, y))

        step = torch.compile(train_step, backend="aot_eager") if compiled and what == "train_step" else train_step
        for x, y in _batches(torch.float32):
            step(x, y)
        results.append(copy.deepcopy(list(model.parameters())))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not math.isnan(results[0][0].sum().item())


def _backward(model: nn.Module, x, y) -> torch.Tensor:
    loss = _loss(model(x), y)
    loss.backward()
    return loss
