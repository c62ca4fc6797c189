"""Data-parallel curvature in spawned processes (gloo, CPU): each rank holds part of the measurement set."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from spawned import run_spawned
from torch import nn

from sharpness.curvature import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    hutchinson_trace,
    spectral_density,
    top_eigenvalues,
)

SIZES = (10, 6)  # unequal parts: the products must weight the ranks by their example counts


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    n = sum(SIZES)
    return torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def part(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank r's batches: its slice of the examples, in two batches of unequal size."""
    x, y = data()
    start = sum(SIZES[:rank])
    x, y = x[start : start + SIZES[rank]], y[start : start + SIZES[rank]]
    return [(x[:3], y[:3]), (x[3:], y[3:])]


def measure(op: HessianOperator) -> dict[str, Any]:
    """Every estimator's result on ``op`` (the default, seeded generators: the same random vectors everywhere)."""
    loss, gradient = op.loss_and_gradient()
    density = spectral_density(op, num_probes=2, num_matvecs_per_probe=8, grid=400)
    return {
        "eigenvalues": top_eigenvalues(op, k=2, tol=1e-10).eigenvalues,
        "trace": hutchinson_trace(op, 20).value,
        "density": density.density,
        "loss": loss,
        "gradient": gradient,
    }


def scenario_measure(rank: int, world_size: int) -> dict[str, Any]:
    return measure(HessianOperator(model(), F.cross_entropy, part(rank), process_group="default"))


def gauss_newton_products(data: Any, process_group: Any = None) -> dict[str, torch.Tensor]:
    """The GGN and the empirical Fisher on a fixed block of 3 vectors (matmat) and on its first column (matvec)."""
    products = {}
    for name, operator in (("ggn", GGNOperator), ("fisher", EmpiricalFisherOperator)):
        op = operator(model(), F.cross_entropy, data, process_group=process_group)
        block = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        products[f"{name}_matmat"] = op.matmat(block)
        products[f"{name}_matvec"] = op.matvec(block[:, 0])
    return products


def scenario_gauss_newton(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    return gauss_newton_products(part(rank), process_group="default")


def spawn(world_size: int = 2) -> list[dict[str, Any]]:
    return run_spawned({"measure": scenario_measure, "gauss_newton": scenario_gauss_newton}, world_size)
