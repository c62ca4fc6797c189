"""Fault injection: a faulty step of any SAM-family optimizer, in any API, is skipped as if never tried.

The matrix (issue 10). Every preset::

    SAM, ASAM (SAM adaptive=True), PeriodicSAM(k=2), RandomSAM(prob=0.5, seed=3), LookSAM(k=2, alpha=0.5),
    AESAM(total_steps=20), AELookSAM(total_steps=20, alpha=0.5)

on two base optimizers (SGD with momentum 0.9, Adam), in every API::

    closure      opt.step(closure)                     (the closure is called once at w, once at w + ε)
    two-step     backward; wants_sam_step(); first_step; backward; second_step   (else erm_step)
    context      backward; wants_sam_step(); with perturbed() as ok: [backward]; second_step   (else erm_step)

with each fault in one step of a short float64 run:

    nan1 / inf1      NaN / inf in the first-pass gradient (at w)
    nan2 / inf2      NaN / inf in the second-pass gradient (at w + ε)
    raise1 / raise2  an exception in the first / second pass

A NaN fault multiplies the loss by a tensor holding NaN (every gradient entry is NaN). An inf fault adds
``(mask * bias).sum()`` with ``mask`` holding one inf: exactly one gradient entry is inf and the rest stays
finite (multiplying the whole loss by inf would give mostly NaN through inf - inf in the backward pass, so it
would not test inf). ``raise1`` in the two-step and context APIs happens in the user's code before any SAM call;
``raise2`` in the two-step API is the user's to clean up with ``opt.restore()`` (SAM is responsible in the closure
and context-manager forms).

The step the fault hits is found per preset by a clean probe run: a SAM step ("sam" landing) for every fault, and
for the switching policies also an ERM step ("erm" landing) for the first-pass gradient faults (a second pass does
not exist there). The reference run asserts the landing, and every test asserts that its fault actually fired.

After the faulty step: (i) the weights are bitwise the ones before; (ii) the base optimizer's state is unchanged
and finite; (iii) LookSAM's stored ``g_v`` is unchanged and finite; (iv) ``steps``, ``sam_steps`` and the policy's
state (step counter, AE-SAM's mean/sigma, the Bernoulli generator) are unchanged and ``is_perturbed`` is False;
(v) the next clean steps, retrying the same batch, give bitwise the weights, base state, ``g_v``, counters and
policy state of a reference optimizer that never saw the faulty step. With a ``GradScaler`` (two-step and context
APIs) the same holds and the scaler backs off exactly once.

A checkpoint taken while a step is pending (after the user's ``restore()`` in the two-step API) holds the
committed state only, so a run resumed from it continues like the live run (the last test).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from sharpness import AESAM, SAM, AELookSAM, LookSAM, PeriodicSAM, RandomSAM

PRESETS: dict[str, Callable[..., SAM]] = {
    "SAM": lambda ps, base, kw: SAM(ps, base, rho=0.1, **kw),
    "ASAM": lambda ps, base, kw: SAM(ps, base, rho=0.5, adaptive=True, **kw),
    "PeriodicSAM": lambda ps, base, kw: PeriodicSAM(ps, base, rho=0.1, k=2, **kw),
    "RandomSAM": lambda ps, base, kw: RandomSAM(ps, base, rho=0.1, prob=0.5, seed=3, **kw),
    "LookSAM": lambda ps, base, kw: LookSAM(ps, base, rho=0.1, k=2, alpha=0.5, **kw),
    "AESAM": lambda ps, base, kw: AESAM(ps, base, rho=0.1, total_steps=20, **kw),
    "AELookSAM": lambda ps, base, kw: AELookSAM(ps, base, rho=0.1, total_steps=20, alpha=0.5, **kw),
}
SWITCHING = ("PeriodicSAM", "RandomSAM", "LookSAM", "AESAM", "AELookSAM")
REUSE = ("LookSAM", "AELookSAM")
BASES: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "adam": (torch.optim.Adam, dict(lr=0.01)),
}
APIS = ("closure", "two-step", "context")
FAULTS = ("nan1", "inf1", "nan2", "inf2", "raise1", "raise2")
CLEAN_AFTER = 3  # clean steps after the faulty one, compared with the reference
INIT_SCALE = 2.0**16


class InjectedError(RuntimeError):
    """The exception a faulty pass raises."""


# ----------------------------------------------------------------------------- model, data, faults


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.float64)


@functools.cache
def _batches(n: int = 40) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    gen = torch.Generator().manual_seed(1)
    return tuple(
        (torch.randn(16, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen))
        for _ in range(n)
    )


class Fault:
    """Which pass of one step goes wrong, and how; counts the passes and records whether the fault fired."""

    def __init__(self, kind: str | None = None) -> None:
        self.what = kind[:-1] if kind else None  # "nan", "inf", "raise" or None (a clean step)
        self.at = int(kind[-1]) if kind else 0  # the pass (1: at w, 2: at w + ε)
        self.passes = 0
        self.fired = False

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        faulty = self.passes == self.at
        self.fired |= faulty
        if faulty and self.what == "raise":
            raise InjectedError(f"pass {self.passes} failed")
        loss = nn.functional.cross_entropy(model(x), y)
        if faulty and self.what == "nan":
            loss = loss * torch.tensor(math.nan, dtype=loss.dtype)
        elif faulty and self.what == "inf":
            bias = model[2].bias
            mask = torch.zeros_like(bias)
            mask[1] = math.inf
            loss = loss + (mask * bias).sum()
        return loss


def test_the_injected_faults_are_what_they_claim() -> None:
    """nan: every gradient entry NaN; inf: exactly one entry +inf, all others finite; raise: raises."""
    model = _mlp()
    x, y = _batches()[0]
    Fault("nan1").loss(model, x, y).backward()
    assert all(torch.isnan(p.grad).all() for p in model.parameters())
    model.zero_grad()
    Fault("inf1").loss(model, x, y).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert int(torch.isinf(grads).sum()) == 1 and not torch.isnan(grads).any()
    assert model[2].bias.grad[1] == math.inf
    with pytest.raises(InjectedError):
        Fault("raise1").loss(model, x, y)
    fault = Fault("nan2")
    fault.loss(model, x, y)
    assert not fault.fired
    fault.loss(model, x, y)
    assert fault.fired


# ----------------------------------------------------------------------------- one step in each API


def _step(
    opt: SAM,
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    api: str,
    fault: Fault,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """One training step as a user writes it (the documented loops of docs/sam.md)."""
    x, y = batch

    def backward() -> None:
        loss = fault.loss(model, x, y)
        (scaler.scale(loss) if scaler is not None else loss).backward()

    if api == "closure":
        assert scaler is None, "the closure form takes no scaler"

        def closure() -> torch.Tensor:
            loss = fault.loss(model, x, y)
            loss.backward()
            return loss

        opt.step(closure)
        return
    backward()
    if opt.wants_sam_step(scaler=scaler):
        if api == "two-step":
            opt.first_step(zero_grad=True, scaler=scaler)
            try:
                backward()
            except InjectedError:
                opt.restore()  # the two-step API leaves the clean-up to the user
                raise
        else:
            with opt.perturbed(scaler=scaler) as ok:
                if ok:
                    backward()
        opt.second_step(zero_grad=True, scaler=scaler)
    else:
        opt.erm_step(zero_grad=True, scaler=scaler)
    if scaler is not None:
        scaler.update()


def _build(preset: str, base: str) -> tuple[nn.Module, SAM]:
    model = _mlp()
    cls, kwargs = BASES[base]
    return model, PRESETS[preset](model.parameters(), cls, kwargs)


@functools.cache
def _fault_step(preset: str, base: str, landing: str) -> int:
    """The first step index >= 2 that a clean run takes as a SAM step ("sam") or an ERM step ("erm").

    At least two clean steps come before it, so that the base optimizer has state and LookSAM a stored ``g_v``.
    """
    model, opt = _build(preset, base)
    for index, batch in enumerate(_batches()[: len(_batches()) - CLEAN_AFTER]):
        sam_steps = opt.sam_steps
        _step(opt, model, batch, "closure", Fault())
        if index >= 2 and (opt.sam_steps > sam_steps) == (landing == "sam"):
            return index
    raise AssertionError(f"{preset}/{base}: no {landing} step in the probe run")


# ----------------------------------------------------------------------------- snapshots and comparisons


def _same(a: Any, b: Any) -> bool:
    """Recursive equality: tensors bitwise (dtype and shape included), NaN equal to NaN."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _all_finite(state: Any) -> bool:
    if isinstance(state, torch.Tensor):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(_all_finite(v) for v in state.values())
    if isinstance(state, list | tuple):
        return all(map(_all_finite, state))
    return not isinstance(state, float) or math.isfinite(state)


def _snapshot(model: nn.Module, opt: SAM) -> dict[str, Any]:
    """Everything a skipped step must leave alone, as clones (keyed by parameter position, not identity)."""
    params = list(model.parameters())
    base_state = opt.base_optimizer.state
    g_v = opt.reuse.g_v if opt.reuse is not None else {}
    return {
        "weights": [p.detach().clone() for p in params],
        "base_state": [
            {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in base_state.get(p, {}).items()}
            for p in params
        ],
        "g_v": {i: g_v[p].clone() for i, p in enumerate(params) if p in g_v},
        "counters": (opt.steps, opt.sam_steps),
        "policy": opt.policy.state_dict(),
        "lr": [group["lr"] for group in opt.param_groups],
    }


def _assert_same_snapshot(got: dict[str, Any], expected: dict[str, Any], policy: bool = True) -> None:
    for key in expected:
        if key == "policy" and not policy:
            continue
        assert _same(got[key], expected[key]), f"{key} differs:\n{got[key]}\nexpected\n{expected[key]}"


def _assert_skipped(model: nn.Module, opt: SAM, before: dict[str, Any], policy: bool = True) -> None:
    """Checks (i)-(iv): the faulty step left no trace."""
    assert not opt.is_perturbed
    after = _snapshot(model, opt)
    _assert_same_snapshot(after, before, policy=policy)
    assert _all_finite(after["base_state"]), "the base optimizer's state is not finite"
    assert _all_finite(after["g_v"]), "LookSAM's g_v is not finite"


# ----------------------------------------------------------------------------- the matrix


def _cases() -> list[Any]:
    cases = []
    for preset in PRESETS:
        for api in APIS:
            for fault in FAULTS:
                landings = ["sam"]
                if preset in SWITCHING and fault in ("nan1", "inf1"):
                    landings.append("erm")
                for landing in landings:
                    cases.append(pytest.param(preset, api, fault, landing, id=f"{preset}-{api}-{fault}-{landing}"))
    return cases


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize(("preset", "api", "fault", "landing"), _cases())
def test_a_faulty_step_is_skipped_and_training_continues(
    preset: str, api: str, fault: str, landing: str, base: str
) -> None:
    index = _fault_step(preset, base, landing)
    batches = _batches()
    model, opt = _build(preset, base)
    ref_model, ref = _build(preset, base)
    for batch in batches[:index]:
        _step(opt, model, batch, api, Fault())
        _step(ref, ref_model, batch, api, Fault())
    before = _snapshot(model, opt)
    assert _same(before, _snapshot(ref_model, ref))  # the two runs agree up to the faulty step
    assert before["base_state"][0], "the base optimizer has state, so that check (ii) bites"
    if preset in REUSE:
        assert before["g_v"], "LookSAM has a stored g_v, so that check (iii) bites"

    injected = Fault(fault)
    if fault.startswith("raise"):
        with pytest.raises(InjectedError):
            _step(opt, model, batches[index], api, injected)
    else:
        _step(opt, model, batches[index], api, injected)
    assert injected.fired, "the fault did not fire: the step did not reach the faulty pass"

    # In the two-step API the user's restore() after an exception leaves the policy's tentative decision pending;
    # it is dropped when the next step begins, which the comparison with the reference below checks.
    user_restored = api == "two-step" and fault == "raise2"
    _assert_skipped(model, opt, before, policy=not user_restored)

    # (v) The same batch again, then more clean steps: the reference never saw the faulty step.
    sam_steps = ref.sam_steps
    _step(ref, ref_model, batches[index], api, Fault())
    assert (ref.sam_steps > sam_steps) == (landing == "sam"), "the faulty step did not land where intended"
    _step(opt, model, batches[index], api, Fault())
    for batch in batches[index + 1 : index + CLEAN_AFTER]:
        _step(opt, model, batch, api, Fault())
        _step(ref, ref_model, batch, api, Fault())
    _assert_same_snapshot(_snapshot(model, opt), _snapshot(ref_model, ref))
    assert opt.steps == index + CLEAN_AFTER


# ----------------------------------------------------------------------------- with a GradScaler


def _scaler_cases() -> list[Any]:
    cases = []
    for preset in PRESETS:
        for api in ("two-step", "context"):
            for fault in ("inf2", "nan2", "inf1", "nan1"):
                landings = ["sam", "erm"] if preset in SWITCHING and fault in ("inf1", "nan1") else ["sam"]
                for landing in landings:
                    cases.append(pytest.param(preset, api, fault, landing, id=f"{preset}-{api}-{fault}-{landing}"))
    return cases


@pytest.mark.parametrize(("preset", "api", "fault", "landing"), _scaler_cases())
def test_grad_scaler_backs_off_once_and_training_continues(preset: str, api: str, fault: str, landing: str) -> None:
    index = _fault_step(preset, "sgd", landing)
    batches = _batches()
    model, opt = _build(preset, "sgd")
    ref_model, ref = _build(preset, "sgd")
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    for batch in batches[:index]:
        _step(opt, model, batch, api, Fault(), scaler)
        _step(ref, ref_model, batch, api, Fault(), ref_scaler)
    assert scaler.get_scale() == INIT_SCALE
    before = _snapshot(model, opt)
    assert _same(before, _snapshot(ref_model, ref))
    if preset in REUSE:
        assert before["g_v"]

    injected = Fault(fault)
    _step(opt, model, batches[index], api, injected, scaler)
    assert injected.fired
    _assert_skipped(model, opt, before)
    assert scaler.get_scale() == INIT_SCALE / 2, "the scaler must back off exactly once"

    sam_steps = ref.sam_steps
    _step(ref, ref_model, batches[index], api, Fault(), ref_scaler)
    assert (ref.sam_steps > sam_steps) == (landing == "sam"), "the faulty step did not land where intended"
    _step(opt, model, batches[index], api, Fault(), scaler)
    for batch in batches[index + 1 : index + CLEAN_AFTER]:
        _step(opt, model, batch, api, Fault(), scaler)
        _step(ref, ref_model, batch, api, Fault(), ref_scaler)
    # A power-of-two loss scale is exact in float64, so the halved scale gives bitwise the reference's steps.
    _assert_same_snapshot(_snapshot(model, opt), _snapshot(ref_model, ref))
    assert scaler.get_scale() == INIT_SCALE / 2, "clean steps after the fault must not back off again"
    assert ref_scaler.get_scale() == INIT_SCALE


# ----------------------------------------------------------------------------- a checkpoint after the user's restore()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_a_checkpoint_after_the_users_restore_resumes_like_the_live_run(preset: str) -> None:
    index = _fault_step(preset, "sgd", "sam")
    batches = _batches()
    model, opt = _build(preset, "sgd")
    for batch in batches[:index]:
        _step(opt, model, batch, "two-step", Fault())
    saved_before = opt.state_dict()["param_groups"][0]["sam"]
    with pytest.raises(InjectedError):
        _step(opt, model, batches[index], "two-step", Fault("raise2"))  # the driver calls opt.restore()
    checkpoint = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})  # as torch.save would
    resumed_model, resumed = _build(preset, "sgd")
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["opt"])
    for batch in batches[index : index + CLEAN_AFTER]:
        _step(opt, model, batch, "two-step", Fault())
        _step(resumed, resumed_model, batch, "two-step", Fault())
    _assert_same_snapshot(_snapshot(resumed_model, resumed), _snapshot(model, opt))
    assert _same(checkpoint["opt"]["param_groups"][0]["sam"], saved_before), (
        "the checkpoint holds the abandoned step's policy state"
    )
