"""LateSAM / the Late policy: ERM (one pass) before start·T, then SAM or AE-SAM, against plain autograd (float64)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from sharpness import SAM, LateSAM
from sharpness.optim.policy import Adaptive, Always, Bernoulli, EveryK, Late, Policy

LR, MOMENTUM, WD, RHO = 0.1, 0.9, 0.01, 0.07


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _batches(n: int = 10) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)
    ]


def _late_sam(model: nn.Module, start: float, total: int, then: Policy | None = None) -> SAM:
    return LateSAM(
        model.parameters(), torch.optim.SGD, RHO, start=start, then=then, total_steps=total,
        lr=LR, momentum=MOMENTUM, weight_decay=WD,
    )  # fmt: skip


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches) -> list[int]:
    """Closure calls per step."""
    calls = []
    for x, y in batches:
        count = [0]

        def closure(x=x, y=y, count=count) -> Tensor:
            count[0] += 1
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        calls.append(count[0])
    return calls


def _reference(model: nn.Module, batches, sam_at) -> tuple[list[Tensor], list[bool]]:
    """SGD (momentum, weight decay) whose gradient is SAM's, ρ g/||g|| ascent, where ``sam_at(t, g)`` says so."""
    w = [p.detach().clone() for p in model.parameters()]
    names = [name for name, _ in model.named_parameters()]
    buf: list[Tensor] | None = None
    decisions = []

    def grad(weights: list[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
        leaves = [v.clone().requires_grad_(True) for v in weights]
        out = torch.func.functional_call(model, dict(zip(names, leaves, strict=True)), (x,))
        return list(torch.autograd.grad(nn.functional.cross_entropy(out, y), leaves))

    for t, (x, y) in enumerate(batches):
        g = grad(w, x, y)
        norm = math.sqrt(sum(float((gi * gi).sum()) for gi in g))
        decisions.append(sam_at(t, norm * norm))
        if decisions[-1]:
            g = grad([wi + RHO * gi / norm for wi, gi in zip(w, g, strict=True)], x, y)
        d = [gi + WD * wi for gi, wi in zip(g, w, strict=True)]
        buf = d if buf is None else [MOMENTUM * b + di for b, di in zip(buf, d, strict=True)]  # carried over
        w = [wi - LR * b for wi, b in zip(w, buf, strict=True)]
    return w, decisions


def _close(model: nn.Module, weights: list[Tensor]) -> None:
    for p, w in zip(model.parameters(), weights, strict=True):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-13)


def test_erm_before_start_then_sam_equals_sgd_then_sam() -> None:
    model, batches = _model(), _batches(10)
    weights, _ = _reference(copy.deepcopy(model), batches, lambda t, s: t >= 4)
    opt = _late_sam(model, 0.4, 10)
    assert _train(model, opt, batches) == [1] * 4 + [2] * 6  # ERM steps cost one forward/backward
    _close(model, weights)
    assert (opt.steps, opt.sam_steps) == (10, 6)


def _adaptive_reference(t0: int, total: int, delta: float = 0.9, lambda1: float = -1.0, lambda2: float = 1.0):
    """AE-SAM's rule (Jiang et al., Alg. 1) on the late phase's own clock: t' = t - t0, T' = T - t0."""
    state = {"mu": 0.0, "var": 0.0}

    def sam_at(t: int, s: float) -> bool:
        if t < t0:
            return False
        tl, tl_total = t - t0, total - t0
        if tl == 0:
            state["mu"], state["var"] = s, 0.0
        else:
            state["mu"] = delta * state["mu"] + (1 - delta) * s
            state["var"] = delta * state["var"] + (1 - delta) * (s - state["mu"]) ** 2
        c = min(tl / tl_total, 1.0) * lambda1 + (1 - min(tl / tl_total, 1.0)) * lambda2
        return s >= state["mu"] + c * math.sqrt(state["var"])

    return sam_at


def test_aesam_in_the_late_phase_decides_as_aesam_on_the_late_steps() -> None:
    model, batches = _model(2), _batches(16)
    weights, decisions = _reference(copy.deepcopy(model), batches, _adaptive_reference(6, 16))
    opt = _late_sam(model, 0.375, 16, then=Adaptive())
    calls = _train(model, opt, batches)
    assert calls == [2 if d else 1 for d in decisions]
    assert not any(decisions[:6]) and decisions[6] and not all(decisions[6:])  # a real mix of late decisions
    _close(model, weights)
    assert opt.policy.then.total_steps == 10


def test_early_steps_compute_no_gradient_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    model, batches = _model(), _batches(6)
    opt = _late_sam(model, 0.5, 6, then=Adaptive())
    norms = []
    original = SAM._first_grad_norm
    monkeypatch.setattr(SAM, "_first_grad_norm", lambda self, *a: norms.append(self.steps) or original(self, *a))
    _train(model, opt, batches)
    assert norms and min(norms) == 3  # only the late steps 3, 4, 5 measure ||g|| (for AE-SAM's s_t)
    assert not Late(0.5, Adaptive(), total_steps=6).needs_grad_norm


@pytest.mark.parametrize("then", [None, Adaptive(), Bernoulli(0.5, seed=3)], ids=["sam", "aesam", "randomsam"])
def test_resume_across_the_switch_is_bit_identical(then: Policy | None) -> None:
    batches = _batches(10)
    straight = _model()
    opt = _late_sam(straight, 0.5, 10, then=copy.deepcopy(then))
    _train(straight, opt, batches)

    first = _model()
    opt = _late_sam(first, 0.5, 10, then=copy.deepcopy(then))
    _train(first, opt, batches[:3])
    saved = copy.deepcopy((first.state_dict(), opt.state_dict()))
    assert saved[1]["param_groups"][0]["sam"]["policy"]["step"] == 3
    resumed = _model(seed=9)
    resumed.load_state_dict(saved[0])
    opt = _late_sam(resumed, 0.5, 10, then=copy.deepcopy(then))
    opt.load_state_dict(saved[1])
    _train(resumed, opt, batches[3:])
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_discard_rolls_back_the_inner_policy_too() -> None:
    policy = Late(0.5, Adaptive(), total_steps=4)
    for s in (1.0, 2.0, 3.0):
        policy.decide(s)
        policy.commit()
    before = repr(policy.state_dict())
    policy.decide(50.0)
    policy.discard()
    assert repr(policy.state_dict()) == before
    assert policy.committed_state_dict()["then"]["step"] == 1


def test_late_delegates_replica_consistency_and_the_generator() -> None:
    class Custom(Policy):
        def _decide(self, sq_grad_norm: float) -> bool:
            return True

    assert Late(0.5).replica_consistent and not Late(0.5, Custom()).replica_consistent
    inner = Bernoulli(0.5)
    assert Late(0.5, inner).generator is inner.generator and Late(0.5).generator is None


def test_settings_and_state_checks() -> None:
    with pytest.raises(ValueError, match=r"Late: start must be .*\[0, 1\]"):
        Late(1.5)
    with pytest.raises(TypeError, match="then must be a sharpness.optim.policy.Policy"):
        Late(0.5, then="sam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs the training length"):
        Late(0.5).decide(1.0)
    saved = Late(0.5, Always(), total_steps=4).state_dict()
    with pytest.raises(ValueError, match="saved by a Always policy"):
        Late(0.5, Adaptive()).load_state_dict(saved)
    with pytest.raises(ValueError, match="saved by a Late policy"):
        EveryK(2).load_state_dict(saved)
    loaded = Late(0.9, Always())
    loaded.load_state_dict(saved)
    assert (loaded.start, loaded.total_steps) == (0.5, 4)


def test_start_zero_is_sam_and_start_one_is_the_base_optimizer() -> None:
    batches = _batches(4)
    for start, calls in ((0.0, [2] * 4), (1.0, [1] * 4)):
        model = _model()
        assert _train(model, _late_sam(model, start, 4), batches) == calls


def test_the_trainer_sets_the_training_length() -> None:
    opt = LateSAM(_model().parameters(), torch.optim.SGD, lr=0.1)
    opt.set_total_steps(100)
    assert (opt.policy.total_steps, opt.policy.first_late_step(), opt.policy.then.total_steps) == (100, 80, 20)


@given(start=st.floats(0.0, 1.0), total=st.integers(1, 10_000))
def test_the_first_late_step_is_the_first_step_at_or_after_start_times_t(start: float, total: int) -> None:
    t0 = Late(start, total_steps=total).first_late_step()
    assert 0 <= t0 <= total
    assert t0 >= start * total - 1e-9 * total and (t0 == 0 or t0 - 1 < start * total)
    decisions = Late(start, total_steps=total)
    assert not decisions.needs_grad_norm
    if 0 < t0 < total:
        decisions.step = t0 - 1
        assert not decisions.in_late_phase()
        decisions.step = t0
        assert decisions.in_late_phase()


def test_decimal_fractions_round_as_written() -> None:
    assert [Late(f, total_steps=100).first_late_step() for f in (0.07, 0.29, 0.57, 0.8)] == [7, 29, 57, 80]
    assert Late(0.25, total_steps=10).first_late_step() == 3
