"""Runs of the SAM family on FSDP2 (``fully_shard``) models, in processes that the tests spawn (gloo, CPU).

Each rank gets its half of every global batch; after ``backward`` FSDP2 holds the mean gradient of the global batch,
sharded, so SAM on the shards must equal single-process SAM on the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from spawned import run_spawned
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from sharpness import AESAM, SAM, LookSAM

STEPS = 5
BASE = dict(lr=0.05, momentum=0.9)
PRESETS: dict[str, Callable[..., SAM]] = {
    "sam": lambda ps: SAM(ps, torch.optim.SGD, rho=0.05, **BASE),
    "sam_pinf": lambda ps: SAM(ps, torch.optim.SGD, rho=0.01, p=float("inf"), **BASE),
    "asam": lambda ps: SAM(ps, torch.optim.Adam, rho=0.5, adaptive=True, lr=0.01),
    "aesam": lambda ps: AESAM(ps, torch.optim.SGD, total_steps=STEPS, **BASE),
    "looksam": lambda ps: LookSAM(ps, torch.optim.SGD, k=2, alpha=0.5, **BASE),
}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen))
        for _ in range(STEPS)
    ]


def train(net: nn.Module, opt: SAM, rank: int, world_size: int) -> None:
    for x, y in batches():
        xs, ys = x.chunk(world_size)[rank], y.chunk(world_size)[rank]

        def closure(xs=xs, ys=ys) -> torch.Tensor:
            loss = nn.functional.cross_entropy(net(xs), ys)
            loss.backward()
            return loss

        opt.step(closure)


def full_parameters(net: nn.Module) -> torch.Tensor:
    return torch.cat(
        [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1) for p in net.parameters()]
    )


def scenario_presets(rank: int, world_size: int) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (world_size,))
    out = {}
    for name, build in PRESETS.items():
        net = model()
        for layer in net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        opt = build(net.parameters())
        train(net, opt, rank, world_size)
        out[name] = {"params": full_parameters(net), "steps": (opt.steps, opt.sam_steps)}
    return out


def scenario_errors(rank: int, world_size: int) -> dict[str, str]:
    """A model sharded only in part cannot give one global gradient norm: a clear error at construction."""
    net = model()
    fully_shard(net[0], mesh=init_device_mesh("cpu", (world_size,)))
    try:
        SAM(net.parameters(), torch.optim.SGD, lr=0.1)
    except ValueError as error:
        return {"partly_sharded": str(error)}
    return {"partly_sharded": ""}


def spawn(world_size: int = 2) -> list[dict[str, Any]]:
    return run_spawned({"presets": scenario_presets, "errors": scenario_errors}, world_size)
