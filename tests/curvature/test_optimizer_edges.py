"""Which edge applies to which optimizer: values, the kind vocabulary, and the preconditioned flag."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sharpness import MSAM, SAM, LookSAM
from sharpness.curvature.edges import adam_edge, gd_edge, momentum_edge, msam_edge, sam_edge, sam_edge_around
from sharpness.curvature.optimizer_edges import StabilityEdge, optimizer_edge

LR = 0.1


def _params() -> list[nn.Parameter]:
    torch.manual_seed(0)
    return list(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).parameters())


@pytest.mark.parametrize(
    "build, value, kind, preconditioned",
    [
        (lambda ps: torch.optim.SGD(ps, lr=LR), gd_edge(LR), "gd", False),
        (lambda ps: torch.optim.SGD(ps, lr=LR, dampening=0.5), gd_edge(LR), "gd", False),
        (lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9), momentum_edge(LR, 0.9), "momentum", False),
        (lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9, dampening=0.5), 76.0, "momentum", False),
        (lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9, nesterov=True), 3.8 / 2.8 / LR, "nesterov", False),
        (lambda ps: torch.optim.Adam(ps, lr=LR), 380.0, "adam", True),
        (lambda ps: torch.optim.AdamW(ps, lr=LR, betas=(0.5, 0.9)), adam_edge(LR, 0.5), "adam", True),
        (lambda ps: torch.optim.RMSprop(ps, lr=LR), gd_edge(LR), "rmsprop", True),
        (lambda ps: torch.optim.RMSprop(ps, lr=LR, momentum=0.9), momentum_edge(LR, 0.9), "rmsprop", True),
        (lambda ps: torch.optim.Adagrad(ps, lr=LR), math.nan, "unknown", False),
    ],
)
def test_base_optimizers(build, value: float, kind: str, preconditioned: bool) -> None:
    edge = optimizer_edge(build(_params()), grad_norm=1.0)
    assert edge.kind == kind and edge.preconditioned is preconditioned
    assert edge.value == pytest.approx(value, rel=1e-12, nan_ok=True)


def test_sam_around_gd_momentum_and_nesterov_is_exact() -> None:
    g = 0.7
    sam = SAM(_params(), torch.optim.SGD, rho=0.05, lr=LR)
    assert optimizer_edge(sam, g) == StabilityEdge(sam_edge(LR, 0.05, g), "sam", False)
    sam = SAM(_params(), torch.optim.SGD, rho=0.05, lr=LR, momentum=0.9)
    assert optimizer_edge(sam, g) == StabilityEdge(sam_edge(LR, 0.05, g, momentum=0.9), "sam+momentum", False)
    sam = SAM(_params(), torch.optim.SGD, rho=0.05, lr=LR, momentum=0.9, nesterov=True)
    expected = sam_edge_around(momentum_edge(LR, 0.9, nesterov=True), 0.05, g)
    assert optimizer_edge(sam, g) == StabilityEdge(expected, "sam+nesterov", False)


def test_sam_without_a_perturbation_or_on_an_erm_step_has_the_base_edge() -> None:
    base = StabilityEdge(momentum_edge(LR, 0.9), "momentum", False)
    sam = SAM(_params(), torch.optim.SGD, rho=0.05, lr=LR, momentum=0.9)
    assert optimizer_edge(sam, 0.0) == base  # ||g|| = 0: SAM takes no perturbation
    assert optimizer_edge(sam, 0.7, sam_step=False) == base
    assert optimizer_edge(SAM(_params(), torch.optim.SGD, rho=0.0, lr=LR, momentum=0.9), 0.7) == base
    looksam = LookSAM(_params(), torch.optim.SGD, rho=0.05, lr=LR, momentum=0.9)
    assert optimizer_edge(looksam, 0.7, sam_step=False) == base


@pytest.mark.parametrize(
    "options, kind",
    [
        ({"adaptive": True}, "asam+momentum (bound)"),
        ({"p": math.inf}, "sam+momentum (bound)"),
        ({"micro_batches": True}, "sam+momentum (bound)"),
    ],
)
def test_perturbations_without_a_closed_form_report_the_base_edge_as_a_bound(options: dict, kind: str) -> None:
    micro = options.pop("micro_batches", False)
    sam = SAM(_params(), torch.optim.SGD, rho=0.05, lr=LR, momentum=0.9, **options)
    edge = optimizer_edge(sam, 0.7, micro_batches=micro)
    assert edge == StabilityEdge(momentum_edge(LR, 0.9), kind, False)
    assert edge.value > optimizer_edge(SAM(_params(), torch.optim.SGD, rho=0.05, lr=LR, momentum=0.9), 0.7).value


def test_sam_on_a_subset_and_sam_around_adam_are_bounds() -> None:
    params = _params()
    groups = [{"params": params[:2]}, {"params": params[2:], "sam_perturb": False}]
    sam = SAM(groups, torch.optim.SGD, rho=0.05, lr=LR)
    assert optimizer_edge(sam, 0.7) == StabilityEdge(gd_edge(LR), "sam (bound)", False)
    sam = SAM(_params(), torch.optim.Adam, rho=0.05, lr=LR)
    assert optimizer_edge(sam, 0.7) == StabilityEdge(adam_edge(LR, 0.9), "sam+adam (bound)", True)


def test_msam_around_sgd_is_exact_with_the_momentum_norm_and_the_warmed_up_rho() -> None:
    params = _params()
    msam = MSAM(params, "sgd", rho=0.3, lr=LR, rho_warmup=4)
    assert optimizer_edge(msam, 1.0) == StabilityEdge(momentum_edge(LR, 0.9), "momentum", False)  # ρ_0 = 0
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        msam.zero_grad()
        hidden = torch.tanh(nn.functional.linear(x, params[0], params[1]))
        nn.functional.linear(hidden, params[2], params[3]).pow(2).mean().backward()
        msam.step()
    norm = math.sqrt(sum(float(msam.state[p]["momentum_buffer"].double().pow(2).sum()) for p in params))
    expected = msam_edge(LR, 0.3 * 2 / 4, norm, 0.9)
    assert optimizer_edge(msam, 1.0) == StabilityEdge(pytest.approx(expected, rel=1e-12), "msam+momentum", False)
    adamw = MSAM(_params(), "adamw", rho=0.3, lr=LR)
    assert optimizer_edge(adamw, 1.0) == StabilityEdge(adam_edge(LR, 0.9), "msam+adam (approximate)", True)


def test_zero_lr_gives_an_infinite_edge_and_disagreeing_groups_an_approximate_one() -> None:
    params = _params()
    assert optimizer_edge(torch.optim.SGD(params, lr=0.0, momentum=0.9), 1.0).value == math.inf
    assert optimizer_edge(SAM(params, torch.optim.SGD, rho=0.05, lr=0.0, momentum=0.9), 1.0).value == math.inf
    assert optimizer_edge(torch.optim.Adam(params, lr=0.0), 1.0).value == math.inf
    groups = [{"params": params[:2], "lr": 0.05}, {"params": params[2:]}]
    edge = optimizer_edge(torch.optim.SGD(groups, lr=LR, momentum=0.9), 1.0)
    assert edge == StabilityEdge(momentum_edge(0.05, 0.9), "momentum (approximate)", False)
    sam = SAM(groups, torch.optim.SGD, rho=0.05, lr=LR, momentum=0.9, adaptive=True)
    assert optimizer_edge(sam, 1.0).kind == "asam+momentum (approximate)"
