"""The norms SAM's steps are built on, against float64 references, and how many of them a step computes."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sharpness.optim.perturbation as perturbation
import sharpness.optim.reuse as reuse_module
from sharpness import AESAM, AELookSAM, LookSAM
from sharpness.optim.perturbation import combine_norms, global_norm
from sharpness.optim.reuse import LookSAMReuse, _projection_coefficient

ORDERS = (1.0, 2.0, 3.0, math.inf)


def _reference(buckets: list[list[torch.Tensor]], ord: float) -> float:
    flat = np.concatenate([t.detach().double().numpy().ravel() for ts in buckets for t in ts])
    peak = np.abs(flat).max()
    if peak == 0 or math.isinf(ord):
        return float(peak)
    return float(peak * np.linalg.norm(flat / peak, ord))  # scaled: no overflow in the reference either


@st.composite
def bucket_lists(draw: st.DrawFn) -> list[list[torch.Tensor]]:
    """One to three buckets (one dtype each) of one to four tensors, float64 entries spread over 1e±150."""
    buckets = []
    for _ in range(draw(st.integers(1, 3))):
        dtype = draw(st.sampled_from([torch.float32, torch.float64]))
        exponent = draw(st.integers(-150, 150) if dtype == torch.float64 else st.integers(-15, 15))
        seed = draw(st.integers(0, 2**16))
        gen = torch.Generator().manual_seed(seed)
        sizes = draw(st.lists(st.integers(1, 20), min_size=1, max_size=4))
        buckets.append([torch.randn(n, generator=gen, dtype=dtype) * 10.0**exponent for n in sizes])
    return buckets


@given(bucket_lists(), st.sampled_from(ORDERS))
def test_global_norm_matches_a_float64_reference_over_a_wide_range(buckets, ord) -> None:
    rtol = 1e-5 if any(ts[0].dtype == torch.float32 for ts in buckets) else 1e-12
    assert global_norm(buckets, ord) == pytest.approx(_reference(buckets, ord), rel=rtol)


@given(st.lists(st.floats(0.0, 1e300), min_size=1, max_size=30), st.sampled_from(ORDERS))
def test_combine_norms_is_the_norm_of_the_norms_without_overflow(norms, ord) -> None:
    peak = max(norms)
    if peak == 0.0 or math.isinf(ord):
        expected = peak
    else:
        expected = peak * math.fsum((n / peak) ** ord for n in norms) ** (1.0 / ord)
    assert combine_norms(norms, ord) == pytest.approx(expected, rel=1e-12)
    assert combine_norms(norms + [math.inf], ord) == math.inf
    assert math.isnan(combine_norms([math.inf, math.nan] + norms, ord))


@given(st.integers(0, 2**16), st.floats(-1.0, 1.0))
def test_projection_coefficient_is_the_inner_product_over_the_squared_norm(seed, mix) -> None:
    """``<a, b> / ||b||²``, also for nearly (anti)parallel vectors, and with ``||b||`` passed in."""
    gen = torch.Generator().manual_seed(seed)
    b = [torch.randn(7, generator=gen, dtype=torch.float64), torch.randn(3, 2, generator=gen, dtype=torch.float64)]
    noise = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in b]
    a = [mix * 3.0 * tb + (1.0 - abs(mix)) * tn for tb, tn in zip(b, noise, strict=True)]
    expected = sum(float((x * y).sum()) for x, y in zip(a, b, strict=True)) / sum(float((y * y).sum()) for y in b)
    assert _projection_coefficient([a], [b]) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    b_norm = global_norm([b], 2.0)
    assert _projection_coefficient([a], [b], b_norm=b_norm) == _projection_coefficient([a], [b])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _step(opt: torch.optim.Optimizer, model: nn.Module, gen: torch.Generator) -> None:
    x, y = torch.randn(12, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (12,), generator=gen)

    def closure() -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)


class _Counter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = perturbation.global_norm

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        for module in (perturbation, reuse_module):
            monkeypatch.setattr(module, "global_norm", counted)
        monkeypatch.setattr("sharpness.optim.sam.global_norm", counted)


@pytest.mark.parametrize(
    "name, build, sam_step_norms, erm_step_norms",
    [
        # AE-SAM: ||g|| for the policy; the perturbation reuses it (h = g for plain p = 2 SAM)
        ("aesam", lambda m: AESAM(m.parameters(), torch.optim.SGD, lr=0.1, total_steps=100), 1, 1),
        # AE-LookSAM: + ||g_s||, ||unit difference|| and ||g_v|| when g_v is stored; an ERM step reuses the
        # policy's ||g|| and the stored ||g_v||
        ("aelooksam", lambda m: AELookSAM(m.parameters(), torch.optim.SGD, lr=0.1, total_steps=100), 4, 1),
        # LookSAM: no policy norm; ||g|| from the perturbation is passed on to the projection
        ("looksam", lambda m: LookSAM(m.parameters(), torch.optim.SGD, k=2, lr=0.1), 4, 1),
    ],
)
def test_a_step_measures_each_norm_once(name, build, sam_step_norms, erm_step_norms, monkeypatch) -> None:
    """The norms a step needs are computed once and passed on (they cost a host synchronisation each)."""
    model, gen = _model(), torch.Generator().manual_seed(0)
    opt = build(model)
    counter = _Counter(monkeypatch)
    seen = {True: set(), False: set()}
    for _ in range(12):
        before_calls, before_sam = counter.calls, opt.sam_steps
        _step(opt, model, gen)
        seen[opt.sam_steps > before_sam].add(counter.calls - before_calls)
    assert seen[True] == {sam_step_norms} and seen[False] == {erm_step_norms}, (name, seen)


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_lookSAM_with_known_norms_equals_measuring_them(alpha) -> None:
    """Passing ||g|| (first step, ERM step) gives the update of measuring it inside the reuse rule."""
    gen = torch.Generator().manual_seed(3)
    params = [[torch.zeros(5, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)]]
    g = [[torch.randn(5, generator=gen, dtype=torch.float64), torch.randn(2, 3, generator=gen, dtype=torch.float64)]]
    g_s = [[t + 0.3 * torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in g[0]]]
    results = []
    for known in (False, True):
        rule = LookSAMReuse(alpha)
        rule.save_first_gradient(params, g, global_norm(g, 2.0) if known else None)
        rule.update(params, g_s)
        erm = [[t.clone() for t in g[0]]]
        rule.apply(params, erm, g_norm=global_norm(erm, 2.0) if known else None)
        results.append(erm[0])
    for with_known, measured in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(with_known, measured, rtol=1e-14, atol=0.0)
