"""Policies and reuse: exact limits, pass counts, AE-SAM's fraction, determinism across resume, LookSAM's g_v."""

from __future__ import annotations

import io
import math
import statistics

import pytest
import torch
from torch import nn

from sharpness import AESAM, SAM, AELookSAM, LookSAM, PeriodicSAM, RandomSAM
from sharpness.optim import Adaptive, Bernoulli, EveryK, LookSAMReuse


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _batches(n: int = 12, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(n)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches, calls: list[int] | None = None) -> None:
    for x, y in batches:
        count = 0

        def closure():
            nonlocal count
            count += 1
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        if calls is not None:
            calls.append(count)


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


BASE = dict(lr=0.1, momentum=0.9)


def _run(make) -> nn.Module:
    model = _mlp()
    _train(model, make(model.parameters()), _batches())
    return model


# ----------------------------------------------------------------------------- exact limits


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: SAM(ps, torch.optim.SGD, rho=0.1, policy=EveryK(1), **BASE),
        lambda ps: RandomSAM(ps, torch.optim.SGD, rho=0.1, prob=1.0, **BASE),
        lambda ps: LookSAM(ps, torch.optim.SGD, rho=0.1, k=1, alpha=0.7, **BASE),
    ],
    ids=["EveryK(1)", "Bernoulli(1)", "LookSAM(k=1)"],
)
def test_limits_that_equal_sam(make) -> None:
    assert _same(_run(make), _run(lambda ps: SAM(ps, torch.optim.SGD, rho=0.1, **BASE)))


def test_bernoulli_zero_is_the_base_optimizer() -> None:
    sam = _run(lambda ps: RandomSAM(ps, torch.optim.SGD, rho=0.1, prob=0.0, **BASE))
    assert _same(sam, _run(lambda ps: torch.optim.SGD(ps, **BASE)))


def test_looksam_with_alpha_zero_is_periodic_sam() -> None:
    looksam = _run(lambda ps: LookSAM(ps, torch.optim.SGD, rho=0.1, k=3, alpha=0.0, **BASE))
    assert _same(looksam, _run(lambda ps: PeriodicSAM(ps, torch.optim.SGD, rho=0.1, k=3, **BASE)))
    reusing = _run(lambda ps: LookSAM(ps, torch.optim.SGD, rho=0.1, k=3, alpha=0.7, **BASE))
    assert not _same(reusing, looksam)  # the control: with α > 0 the reuse does change the trajectory


# ----------------------------------------------------------------------------- passes and API


def test_erm_steps_cost_exactly_one_closure_call() -> None:
    model = _mlp()
    opt = PeriodicSAM(model.parameters(), torch.optim.SGD, rho=0.1, k=3, **BASE)
    calls: list[int] = []
    _train(model, opt, _batches(7), calls)
    assert calls == [2, 1, 1, 2, 1, 1, 2]
    assert opt.statistics()["steps"] == 7 and opt.statistics()["sam_steps"] == 3


def test_two_step_api_follows_the_same_decisions_as_the_closure() -> None:
    batches = _batches(20)
    a, b = _mlp(), _mlp()
    opt_a = AELookSAM(a.parameters(), torch.optim.SGD, rho=0.1, total_steps=20, alpha=0.5, **BASE)
    opt_b = AELookSAM(b.parameters(), torch.optim.SGD, rho=0.1, total_steps=20, alpha=0.5, **BASE)
    _train(a, opt_a, batches)
    decisions = []
    for x, y in batches:
        nn.functional.cross_entropy(b(x), y).backward()
        decisions.append(opt_b.wants_sam_step())
        assert opt_b.wants_sam_step() == decisions[-1]  # asking twice does not advance the policy
        if decisions[-1]:
            opt_b.first_step(zero_grad=True)
            nn.functional.cross_entropy(b(x), y).backward()
            opt_b.second_step(zero_grad=True)
        else:
            opt_b.erm_step(zero_grad=True)
    assert _same(a, b)
    assert 0 < sum(decisions) < len(decisions)
    assert opt_a.statistics() == opt_b.statistics()


def test_adaptive_policy_needs_the_training_length() -> None:
    model = _mlp()
    opt = AESAM(model.parameters(), torch.optim.SGD, rho=0.1, **BASE)
    with pytest.raises(ValueError, match="needs the training length"):
        _train(model, opt, _batches(1))
    opt.set_total_steps(10)
    _train(model, opt, _batches(1))
    assert opt.policy.total_steps == 10


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: EveryK(0), "k must be an integer >= 1"),
        (lambda: Bernoulli(1.5), r"probability must be a number in \[0, 1\]"),
        (lambda: Adaptive(delta=1.0), "delta"),
        (lambda: Adaptive(lambda1=math.nan), "lambda1"),
        (lambda: LookSAMReuse(alpha=-1), "alpha"),
        (lambda: Adaptive(total_steps=0), "total_steps"),
    ],
)
def test_bad_policy_arguments(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_scheduled_bernoulli_probability_is_checked_when_used() -> None:
    policy = Bernoulli(lambda progress: 2.0 * progress)
    policy.set_total_steps(4)
    for _ in range(3):
        policy.decide(math.nan)
    with pytest.raises(ValueError, match="probability"):
        policy.decide(math.nan)


# ----------------------------------------------------------------------------- AE-SAM on synthetic s_t


def _gaussian_normal_tail(c: float) -> float:
    return 0.5 * math.erfc(c / math.sqrt(2))


def test_adaptive_fraction_matches_the_normal_model_and_rises() -> None:
    """With Gaussian s_t the rule s ≥ μ + cσ fires with probability ≈ P(Z ≥ c_t); c_t falls so it rises."""
    total = 30_000
    policy = Adaptive(delta=0.9, lambda1=-1.0, lambda2=1.0, total_steps=total)
    gen = torch.Generator().manual_seed(0)
    s = (5.0 + torch.randn(total, generator=gen, dtype=torch.float64)).tolist()
    decisions, expected = [], []
    for value in s:
        expected.append(_gaussian_normal_tail(policy.threshold()))
        decisions.append(policy.decide(value))
    fraction = sum(decisions) / total
    assert fraction == pytest.approx(statistics.mean(expected), abs=0.03)
    quarters = [sum(decisions[i * total // 4 : (i + 1) * total // 4]) / (total // 4) for i in range(4)]
    assert quarters == sorted(quarters)
    assert quarters[0] < 0.25 and quarters[-1] > 0.75
    for q, i in zip(quarters, range(4), strict=True):
        mid = statistics.mean(expected[i * total // 4 : (i + 1) * total // 4])
        assert q == pytest.approx(mid, abs=0.04)
    last = policy.statistics()
    assert set(last) == {"s", "mu", "sigma", "c"} and last["c"] == pytest.approx(-1.0, abs=1e-3)


def test_adaptive_initialisation_choices() -> None:
    first, zero = Adaptive(total_steps=10, init="first"), Adaptive(total_steps=10, init="zero")
    assert first.decide(4.0) is True and first.mean == 4.0 and first.sigma == 0.0
    zero.decide(4.0)
    assert zero.mean == pytest.approx(0.4) and zero.sigma**2 == pytest.approx(0.1 * 3.6**2)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: AESAM(ps, torch.optim.SGD, rho=0.1, total_steps=24, **BASE),
        lambda ps: AELookSAM(ps, torch.optim.SGD, rho=0.1, total_steps=24, alpha=0.5, **BASE),
        lambda ps: RandomSAM(ps, torch.optim.SGD, rho=0.1, prob=0.4, seed=3, **BASE),
    ],
    ids=["AESAM", "AELookSAM", "RandomSAM"],
)
def test_decisions_and_weights_survive_a_checkpoint(make) -> None:
    batches = _batches(24)
    whole_model = _mlp()
    whole = make(whole_model.parameters())
    whole_calls: list[int] = []
    _train(whole_model, whole, batches, whole_calls)

    model = _mlp()
    opt = make(model.parameters())
    calls: list[int] = []
    _train(model, opt, batches[:10], calls)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = _mlp(seed=99)
    resumed_model.load_state_dict(saved["model"])
    resumed = make(resumed_model.parameters())
    resumed.load_state_dict(saved["opt"])
    _train(resumed_model, resumed, batches[10:], calls)

    assert calls == whole_calls
    assert 2 in calls and 1 in calls
    assert _same(whole_model, resumed_model)
    assert resumed.statistics() == whole.statistics()


# ----------------------------------------------------------------------------- LookSAM's reuse


def test_looksam_g_v_is_orthogonal_and_the_reuse_has_the_documented_norm() -> None:
    torch.set_default_dtype(torch.float64)
    try:
        model = _mlp()
        opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.5, k=2, alpha=0.3, **BASE)
        (x, y), (x2, y2) = _batches(2)
        nn.functional.cross_entropy(model(x.double()), y).backward()
        g = [p.grad.clone() for p in model.parameters()]
        assert opt.wants_sam_step()
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(model(x.double()), y).backward()
        g_s = [p.grad.clone() for p in model.parameters()]
        opt.second_step(zero_grad=True)
        g_v = [opt.reuse.g_v[p] for p in model.parameters()]
        flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
        g, g_s, g_v = flat(g), flat(g_s), flat(g_v)
        assert torch.dot(g_v, g).abs() < 1e-12 * g_v.norm() * g.norm()
        torch.testing.assert_close(g_v, g_s - torch.dot(g_s, g) / torch.dot(g, g) * g)

        nn.functional.cross_entropy(model(x2.double()), y2).backward()
        plain = flat([p.grad.clone() for p in model.parameters()])
        assert not opt.wants_sam_step()
        before = _weights(model)
        opt.erm_step()
        reused = flat([p.grad for p in model.parameters()])
        assert (reused - plain).norm().item() == pytest.approx(0.3 * plain.norm().item(), rel=1e-10)
        torch.testing.assert_close(reused, plain + 0.3 * plain.norm() / g_v.norm() * g_v)
        assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    finally:
        torch.set_default_dtype(torch.float32)


def test_looksam_per_tensor_reuse_scales_each_tensor() -> None:
    model = _mlp()
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.5, k=2, alpha=0.3, per_tensor=True, **BASE)
    _train(model, opt, _batches(1))
    ((x, y),) = _batches(1, seed=5)
    nn.functional.cross_entropy(model(x), y).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    opt.erm_step()
    for p, g in zip(model.parameters(), plain, strict=True):
        added = p.grad - g
        assert added.norm().item() == pytest.approx(0.3 * g.norm().item(), rel=1e-4)


def test_reuse_before_any_sam_step_is_plain_erm() -> None:
    model, reference = _mlp(), _mlp()
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, k=2, alpha=0.7, **BASE)
    opt.policy = EveryK(2, offset=1)  # the first step is an ERM step: no g_v yet
    base = torch.optim.SGD(reference.parameters(), **BASE)
    _train(model, opt, _batches(1))
    _train(reference, base, _batches(1))
    assert _same(model, reference)


def test_an_aborted_step_is_decided_afresh_next_time() -> None:
    """An exception in the second pass abandons the step: the policy is rolled back and asked again next time."""
    model = _mlp()
    opt = AESAM(model.parameters(), torch.optim.SGD, rho=0.1, total_steps=10, **BASE)
    (x, y), (x2, y2) = _batches(2)
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("second pass failed")
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError):
        opt.step(failing)  # step 0 of AE-SAM is a SAM step (init="first")
    assert opt.policy.step == 0 and not opt.is_perturbed and opt.statistics()["steps"] == 0
    assert opt.policy.mean == 0.0  # s_t of the abandoned step was not absorbed
    _train(model, opt, [(x2, y2)])
    assert opt.policy.step == 1 and opt.statistics()["steps"] == 1
