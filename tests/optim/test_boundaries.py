"""Correctness at the boundaries (issue 10, A1–A10): each test reproduces a failure of version 0.1.

Mixed precision (GradScaler, fp16/bf16), extreme gradient norms, zero-size and complex tensors, base optimizers
with their own ``rho``/``maximize``, the clipping recipe, and policy counters on skipped steps.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from sharpness import AESAM, SAM, AELookSAM, LookSAM, PeriodicSAM, RandomSAM
from sharpness.optim.perturbation import global_norm


def _mlp(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _batches(count: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 5, generator=gen).to(dtype), torch.randint(0, 3, (16,), generator=gen)) for _ in range(count)
    ]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x).float(), y)


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _two_step(opt: SAM, model: nn.Module, x, y, scaler=None, scale_second: float = 1.0) -> None:
    """One step of the documented two-step loop, with an optional GradScaler and a factor on the second loss."""
    backward = (lambda loss: scaler.scale(loss).backward()) if scaler is not None else (lambda loss: loss.backward())
    backward(_loss(model, x, y))
    if opt.wants_sam_step(scaler=scaler):
        if opt.first_step(zero_grad=True, scaler=scaler):
            backward(_loss(model, x, y) * scale_second)
        opt.second_step(zero_grad=True, scaler=scaler)
    else:
        opt.erm_step(zero_grad=True, scaler=scaler)
    if scaler is not None:
        scaler.update()


# ----------------------------------------------------------------------------- A1/A2: non-finite second pass


@pytest.mark.parametrize("preset", ["sam", "looksam", "aesam"])
@pytest.mark.parametrize("api", ["closure", "two_step", "context"])
def test_non_finite_second_gradient_skips_the_step(preset: str, api: str) -> None:
    model = _mlp(torch.float64)
    build = {
        "sam": lambda ps: SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9),
        "looksam": lambda ps: LookSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, k=1, alpha=0.5),
        "aesam": lambda ps: AESAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, lambda2=-10.0, total_steps=50),
    }[preset]
    opt = build(model.parameters())
    (x, y), (x2, y2) = _batches(2, torch.float64)
    opt.step(lambda: _backward(model, x, y))  # momentum buffers and g_v exist now
    weights, state = _weights(model), _clone_state(opt)
    g_v = {k: v.clone() for k, v in opt.reuse.g_v.items()} if opt.reuse is not None else None
    policy_state, steps = opt.policy.state_dict(), (opt.steps, opt.sam_steps)
    _step_with_nan_second_pass(opt, model, x2, y2, api)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert _states_equal(_clone_state(opt), state)
    if g_v is not None:
        assert all(torch.equal(opt.reuse.g_v[k], v) for k, v in g_v.items())
    assert (opt.steps, opt.sam_steps) == steps and opt.policy.state_dict()["step"] == policy_state["step"]
    opt.step(lambda: _backward(model, x2, y2))  # and training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _backward(model: nn.Module, x, y) -> torch.Tensor:
    loss = _loss(model, x, y)
    loss.backward()
    return loss


def _step_with_nan_second_pass(opt: SAM, model: nn.Module, x, y, api: str) -> None:
    calls = []

    def closure():
        calls.append(1)
        loss = _loss(model, x, y) * (math.nan if len(calls) == 2 else 1.0)
        loss.backward()
        return loss

    if api == "closure":
        opt.step(closure)
        return
    closure()
    assert opt.wants_sam_step()
    if api == "two_step":
        opt.first_step(zero_grad=True)
        closure()
    else:
        with opt.perturbed():
            closure()
    opt.second_step(zero_grad=True)


def _clone_state(opt: SAM) -> dict:
    return {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()}


def _states_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(
        all(torch.equal(a[i][k], b[i][k]) if torch.is_tensor(b[i][k]) else a[i][k] == b[i][k] for k in b[i]) for i in b
    )


def test_looksam_with_grad_scaler_survives_an_overflow_in_the_perturbed_pass() -> None:
    """One inf in the perturbed pass: g_v stays finite and the following ERM steps are normal steps."""
    model, reference = _mlp(), _mlp()
    opt = LookSAM(model.parameters(), torch.optim.SGD, lr=0.05, k=3, alpha=0.5)
    ref = LookSAM(reference.parameters(), torch.optim.SGD, lr=0.05, k=3, alpha=0.5)
    scaler, ref_scaler = torch.amp.GradScaler("cpu", init_scale=256.0), torch.amp.GradScaler("cpu", init_scale=256.0)
    batches = _batches(7)
    for x, y in batches[:3]:  # SAM, ERM, ERM
        _two_step(opt, model, x, y, scaler)
        _two_step(ref, reference, x, y, ref_scaler)
    g_v = {k: v.clone() for k, v in opt.reuse.g_v.items()}
    _two_step(opt, model, *batches[3], scaler, scale_second=math.inf)  # a SAM step: its perturbed pass overflows
    assert scaler.get_scale() == 128.0  # backed off once
    assert all(torch.equal(opt.reuse.g_v[k], v) for k, v in g_v.items())  # g_v kept, finite
    assert opt.steps == 3 and opt.sam_steps == 1 and opt.policy.step == 3  # the skipped step is not counted
    for x, y in batches[4:]:  # the skipped step is retried as a SAM step; the schedule is the reference's
        _two_step(opt, model, x, y, scaler)
        _two_step(ref, reference, x, y, ref_scaler)
    assert scaler.get_scale() == 128.0 and opt.sam_steps == ref.sam_steps == 2
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- A3: scale-invariant policies


@pytest.mark.parametrize("preset", [AESAM, AELookSAM])
def test_adaptive_decisions_do_not_depend_on_the_loss_scale(preset) -> None:
    """The same fp32 run with and without a GradScaler (whose scale changes) takes the same decisions."""
    batches = _batches(40)
    plain_model, scaled_model = _mlp(), _mlp()
    plain = preset(plain_model.parameters(), torch.optim.SGD, lr=0.05, total_steps=40)
    scaled = preset(scaled_model.parameters(), torch.optim.SGD, lr=0.05, total_steps=40)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)  # the scale doubles every 3 steps
    plain_decisions, scaled_decisions, scales = [], [], set()
    for x, y in batches:
        _loss(plain_model, x, y).backward()
        plain_decisions.append(plain.wants_sam_step())
        plain.erm_step(zero_grad=True)  # both take the same kind of step: only the decisions are compared
        scaler.scale(_loss(scaled_model, x, y)).backward()
        scaled_decisions.append(scaled.wants_sam_step(scaler=scaler))
        scaled.erm_step(zero_grad=True, scaler=scaler)
        scales.add(scaler.get_scale())
        scaler.update()
    assert len(scales) > 5
    assert plain_decisions == scaled_decisions
    assert 0 < sum(plain_decisions) < len(plain_decisions)
    assert plain.policy.mean == pytest.approx(scaled.policy.mean, rel=1e-5)


# ----------------------------------------------------------------------------- A4: norms at the edges of range


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("magnitude", ["huge", "tiny", "normal"])
@pytest.mark.parametrize("p", [2.0, 3.0, math.inf])
def test_perturbation_has_norm_rho_for_any_finite_gradient(dtype: torch.dtype, magnitude: str, p: float) -> None:
    """Finite gradients of any magnitude the dtype can hold give ||ε||_p = ρ (fp16 norm > 65504, fp32 ≳ 1e19)."""
    info = torch.finfo(dtype)
    value = {"huge": min(info.max / 4, 1e300), "tiny": info.tiny * 64, "normal": 1.0}[magnitude]
    gen = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.zeros(300, dtype=dtype))
    direction = torch.rand(300, generator=gen, dtype=torch.float64) + 0.5
    param.grad = (direction * value / 1.5).to(dtype)
    assert torch.isfinite(param.grad).all() and (param.grad != 0).all()
    opt = SAM([param], torch.optim.SGD, rho=0.5, p=p, lr=0.1)
    assert opt.first_step()
    eps = param.detach().double()
    assert torch.linalg.vector_norm(eps, p).item() == pytest.approx(0.5, rel=max(4 * info.eps, 1e-12))
    assert math.isfinite(opt.last_grad_norm) and opt.last_grad_norm > 0
    opt.restore()


def test_global_norm_of_float64_gradients_beyond_the_square_root_of_max() -> None:
    huge = [[torch.full((4,), 1e200, dtype=torch.float64)]]
    assert global_norm(huge, 2.0) == pytest.approx(2e200, rel=1e-12)
    tiny = [[torch.full((4,), 1e-200, dtype=torch.float64)]]
    assert global_norm(tiny, 2.0) == pytest.approx(2e-200, rel=1e-12)


def test_subnormal_float64_gradient_gives_a_finite_perturbation_of_radius_rho() -> None:
    """||g|| ~ 1e-320: ρ/||g|| overflowed (a Python error or inf) in version 0.1."""
    param = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    param.grad = torch.tensor([1e-320, -2e-320, 0.0], dtype=torch.float64)
    opt = SAM([param], torch.optim.SGD, rho=0.1, lr=0.1)
    assert opt.first_step()
    assert torch.isfinite(param).all()
    assert torch.linalg.vector_norm(param.detach()).item() == pytest.approx(0.1, rel=1e-2)  # subnormal inputs


def test_adaptive_statistics_of_huge_float64_gradients_stay_finite() -> None:
    model = _mlp(torch.float64)
    opt = AESAM(model.parameters(), torch.optim.SGD, lr=0.0, total_steps=10)
    for scale in (1.0, 1e150, 1.0):  # s_t = 1e300 against a mean near 1: (s - μ)² overflows a float
        for p in model.parameters():
            p.grad = torch.full_like(p, scale)
        opt.wants_sam_step()
        opt.erm_step(zero_grad=True)
    stats = opt.statistics()
    assert math.isfinite(stats["mu"]) and math.isfinite(stats["sigma"]) and stats["sigma"] > 0


def test_asam_perturbation_is_finite_when_t_squared_g_overflows() -> None:
    """ASAM's ε = ρ T² g/||T g|| is representable although T² g is not (|w| = 1e15, g = 1e10 in float32)."""
    param = nn.Parameter(torch.tensor([[1e15, 2e15], [1.0, -3e15]], dtype=torch.float32))
    param.grad = torch.tensor([[1e10, -1e10], [2e10, 1e10]], dtype=torch.float32)
    opt = SAM([param], torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1)
    before = param.detach().double()
    assert opt.first_step()
    eps = param.detach().double() - before
    t = before.abs() + 0.01
    g = param.grad.double()
    expected = 0.5 * t * t * g / torch.linalg.vector_norm(t * g)
    assert torch.isfinite(eps).all()
    torch.testing.assert_close(eps, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


# ----------------------------------------------------------------------------- A5: zero-size parameters


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0, math.inf])
def test_zero_size_parameters_are_ignored(p: float) -> None:
    empty, weight = nn.Parameter(torch.zeros(0, 3)), nn.Parameter(torch.tensor([3.0, -4.0]))
    empty.grad, weight.grad = torch.zeros(0, 3), torch.tensor([3.0, -4.0])
    opt = SAM([empty, weight], torch.optim.SGD, rho=0.2, p=p, lr=0.1)
    assert opt.first_step()
    assert torch.linalg.vector_norm(weight.detach() - torch.tensor([3.0, -4.0]), p).item() == pytest.approx(0.2)
    opt.second_step()


def test_skipped_step_with_grad_scaler_when_the_first_gradient_is_empty() -> None:
    """The NaN that tells the scaler to skip goes into the first non-empty gradient (IndexError in 0.1)."""
    empty, weight = nn.Parameter(torch.zeros(0)), nn.Parameter(torch.ones(3))
    opt = SAM([empty, weight], torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))  # as the loss would be
    empty.grad, weight.grad = torch.zeros(0), torch.tensor([1.0, math.inf, 0.0])
    assert not opt.first_step(scaler=scaler)
    opt.second_step(scaler=scaler)
    scaler.update()
    assert scaler.get_scale() == 2.0 and torch.equal(weight.detach(), torch.ones(3))


# ----------------------------------------------------------------------------- A6: SAM's own namespace


def test_adadelta_keeps_its_own_rho() -> None:
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.Adadelta, rho=0.05, lr=1.0)
    assert opt.param_groups[0]["rho"] == 0.9 and opt.param_groups[0]["sam_rho"] == 0.05
    built = torch.optim.Adadelta(_mlp().parameters(), rho=0.8)
    wrapped = SAM(None, built, rho=0.05)
    param = built.param_groups[0]["params"][0]
    for q in built.param_groups[0]["params"]:
        q.grad = torch.ones_like(q)
    before = param.detach().clone()
    wrapped.first_step()
    total = math.sqrt(sum(q.numel() for q in built.param_groups[0]["params"]))
    assert (param.detach() - before).norm().item() == pytest.approx(0.05 * math.sqrt(param.numel()) / total)
    assert built.param_groups[0]["rho"] == 0.8
    wrapped.restore()


def test_group_added_through_the_base_optimizer_gets_sam_defaults() -> None:
    model, extra = _mlp(), nn.Linear(2, 2)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.07, lr=0.1)
    opt.base_optimizer.add_param_group({"params": extra.parameters()})
    x, y = _batches(1)[0]
    opt.step(lambda: _backward(model, x, y) + extra(torch.ones(1, 2)).sum() * 0 + _extra_backward(extra))
    assert opt.param_groups[1]["sam_rho"] == 0.07 and opt.steps == 1


def _extra_backward(extra: nn.Module) -> torch.Tensor:
    loss = extra(torch.ones(1, 2)).pow(2).sum()
    loss.backward()
    return loss.detach()


def test_a_bare_sam_key_in_a_group_is_named_with_its_new_key() -> None:
    with pytest.raises(ValueError, match="use 'sam_rho'"):
        SAM([{"params": _mlp().parameters(), "rho": 0.1}], torch.optim.SGD, lr=0.1)


# ----------------------------------------------------------------------------- A7: maximize


@pytest.mark.parametrize("base, kwargs", [(torch.optim.SGD, {"momentum": 0.9}), (torch.optim.Adam, {})])
@pytest.mark.parametrize("options", [{}, {"adaptive": True}, {"p": math.inf}, {"include_weight_decay": True}])
def test_maximizing_l_equals_minimizing_minus_l(base, kwargs, options) -> None:
    batches = _batches(3, torch.float64)
    up, down = _mlp(torch.float64), _mlp(torch.float64)
    opt_up = SAM(up.parameters(), base, lr=0.01, weight_decay=0.01, maximize=True, **options, **kwargs)
    opt_down = SAM(down.parameters(), base, lr=0.01, weight_decay=0.01, **options, **kwargs)
    for x, y in batches:
        opt_up.step(lambda: _backward(up, x, y))
        opt_down.step(lambda: _negative_backward(down, x, y))
    for p, q in zip(up.parameters(), down.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def _negative_backward(model: nn.Module, x, y) -> torch.Tensor:
    loss = -_loss(model, x, y)
    loss.backward()
    return loss


# ----------------------------------------------------------------------------- A8: the clipping recipe


@pytest.mark.parametrize("unscale", ["opt", "base_optimizer"])
def test_unscale_then_second_step_divides_by_the_scale_once(unscale: str) -> None:
    """torch's recipe: scaler.unscale_(opt); clip_grad_norm_(...); then the step (here: second_step(scaler=))."""
    (x, y) = _batches(1)[0]
    results = []
    for use_scaler in (False, True):
        model = _mlp()
        opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=use_scaler)
        scaler.scale(_loss(model, x, y)).backward()
        opt.first_step(zero_grad=True, scaler=scaler)
        scaler.scale(_loss(model, x, y)).backward()
        scaler.unscale_(opt if unscale == "opt" else opt.base_optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1)
        opt.second_step(zero_grad=True, scaler=scaler)
        scaler.update()
        results.append(_weights(model))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_scaler_step_on_sam_finishes_the_step_after_the_perturbed_block() -> None:
    """The standard AMP loop works unchanged: with opt.perturbed(): ...; scaler.step(opt); scaler.update()."""
    (x, y) = _batches(1)[0]
    model, reference = _mlp(), _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    ref = SAM(reference.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    scaler.scale(_loss(model, x, y)).backward()
    with opt.perturbed(scaler=scaler):
        scaler.scale(_loss(model, x, y)).backward()
    scaler.step(opt)
    scaler.update()
    ref.step(lambda: _backward(reference, x, y))
    assert opt.steps == 1
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- A10: smaller items


def test_random_sam_p_is_the_norm_and_prob_the_probability() -> None:
    opt = RandomSAM(_mlp().parameters(), torch.optim.SGD, lr=0.1, p=math.inf, prob=0.25)
    assert opt.param_groups[0]["sam_p"] == math.inf and opt.policy.p == 0.25


@pytest.mark.parametrize("p", [1.0, 3.0, math.inf])
def test_complex_parameters_are_pairs_of_real_coordinates(p: float) -> None:
    gen = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.randn(4, dtype=torch.complex128, generator=gen))
    param.grad = torch.randn(4, dtype=torch.complex128, generator=gen)
    real = nn.Parameter(torch.view_as_real(param.detach()).clone())
    real.grad = torch.view_as_real(param.grad).clone()
    opt, ref = SAM([param], torch.optim.SGD, p=p, lr=0.1), SAM([real], torch.optim.SGD, p=p, lr=0.1)
    assert opt.first_step() and ref.first_step()
    torch.testing.assert_close(torch.view_as_real(param.detach()), real.detach(), rtol=0, atol=1e-15)


def test_named_parameters_with_a_built_optimizer() -> None:
    model = _mlp()
    opt = SAM(model.named_parameters(), torch.optim.SGD(model.named_parameters(), lr=0.1))
    x, y = _batches(1)[0]
    opt.step(lambda: _backward(model, x, y))
    assert opt.steps == 1


def test_looksam_projection_in_bfloat16_is_as_precise_as_float32() -> None:
    """g_v = g_s - (<g_s,g>/||g||²) g from bf16 gradients equals the float32 computation up to bf16 rounding."""
    gen = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16))
    g = torch.randn(4096, generator=gen).to(torch.bfloat16)
    g_s = (g.float() * 1.0 + 0.01 * torch.randn(4096, generator=gen)).to(torch.bfloat16)  # nearly parallel
    opt = LookSAM([param], torch.optim.SGD, lr=0.0, k=2)
    param.grad = g.clone()
    assert opt.wants_sam_step()
    opt.first_step(zero_grad=True)
    param.grad = g_s.clone()
    opt.second_step()
    gf, gsf = g.double(), g_s.double()
    expected = gsf - (gsf @ gf) / (gf @ gf) * gf
    got = opt.reuse.g_v[param].double()
    error = (got - expected).norm() / expected.norm()
    assert error < 2.0**-8  # bf16 storage of g_v; version 0.1: ~0.3 (cancellation in bf16)


def test_per_tensor_looksam_projects_each_tensor() -> None:
    a, b = nn.Parameter(torch.zeros(3, dtype=torch.float64)), nn.Parameter(torch.zeros(2, dtype=torch.float64))
    g = [torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)]
    g_s = [torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), torch.tensor([3.0, 1.0], dtype=torch.float64)]
    opt = LookSAM([a, b], torch.optim.SGD, lr=0.0, k=2, per_tensor=True)
    a.grad, b.grad = g[0].clone(), g[1].clone()
    assert opt.wants_sam_step()
    opt.first_step(zero_grad=True)
    a.grad, b.grad = g_s[0].clone(), g_s[1].clone()
    opt.second_step()
    for param, gi, gsi in zip((a, b), g, g_s, strict=True):
        expected = gsi - (gsi @ gi) / (gi @ gi) * gi
        torch.testing.assert_close(opt.reuse.g_v[param], expected, rtol=0, atol=1e-15)
        assert abs(float(opt.reuse.g_v[param] @ gi)) < 1e-15  # orthogonal per tensor


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: PeriodicSAM(ps, torch.optim.SGD, lr=0.1, k=3),
        lambda ps: RandomSAM(ps, torch.optim.SGD, lr=0.1, prob=0.5, seed=2),
    ],
    ids=["EveryK", "Bernoulli"],
)
def test_policy_counters_do_not_advance_on_skipped_steps(make) -> None:
    """A skipped step leaves the schedule where it was: the run equals one that never saw the bad batch."""
    batches = _batches(8, torch.float64)
    model, reference = _mlp(torch.float64), _mlp(torch.float64)
    opt, ref = make(model.parameters()), make(reference.parameters())
    for index, (x, y) in enumerate(batches):
        if index == 3:
            bad = x.clone()
            bad[0, 0] = math.nan
            opt.step(lambda: _backward(model, bad, y))
        opt.step(lambda: _backward(model, x, y))
        ref.step(lambda: _backward(reference, x, y))
    assert opt.policy.state_dict()["step"] == ref.policy.state_dict()["step"] == 8
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


def test_two_step_loop_that_ignores_the_policy_warns_once() -> None:
    model = _mlp()
    opt = PeriodicSAM(model.parameters(), torch.optim.SGD, lr=0.1, k=2)
    x, y = _batches(1)[0]
    with pytest.warns(UserWarning, match="wants_sam_step"):
        for _ in range(3):
            _loss(model, x, y).backward()
            opt.first_step(zero_grad=True)
            _loss(model, x, y).backward()
            opt.second_step(zero_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _loss(model, x, y).backward()
        opt.first_step(zero_grad=True)  # once only
        _loss(model, x, y).backward()
        opt.second_step(zero_grad=True)
