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

from sharpness import AESAM, MSAM, SAM, AELookSAM, LookSAM

STEPS = 5
BASE = dict(lr=0.05, momentum=0.9)
PRESETS: dict[str, Callable[..., SAM]] = {
    "sam": lambda ps: SAM(ps, torch.optim.SGD, rho=0.05, **BASE),
    "sam_pinf": lambda ps: SAM(ps, torch.optim.SGD, rho=0.01, p=float("inf"), **BASE),
    "asam": lambda ps: SAM(ps, torch.optim.Adam, rho=0.5, adaptive=True, lr=0.01),
    "aesam": lambda ps: AESAM(ps, torch.optim.SGD, total_steps=STEPS, **BASE),
    "looksam": lambda ps: LookSAM(ps, torch.optim.SGD, k=2, alpha=0.5, **BASE),
    "aelooksam": lambda ps: AELookSAM(ps, torch.optim.SGD, total_steps=STEPS, alpha=0.5, **BASE),
    "msam": lambda ps: MSAM(ps, torch.optim.SGD, rho=0.3, **BASE),
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


def train(net: nn.Module, opt: SAM, rank: int, world_size: int, data: list | None = None) -> None:
    for x, y in batches() if data is None else data:
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
        net = sharded_model(mesh)
        opt = build(net.parameters())
        train(net, opt, rank, world_size)
        out[name] = {"params": full_parameters(net), "steps": (opt.steps, getattr(opt, "sam_steps", None))}
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


def sharded_model(mesh: Any) -> nn.Module:
    net = model()
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def scenario_dcp_resume(rank: int, world_size: int) -> dict[str, Any]:
    """Train 3 steps, save through torch.distributed.checkpoint, load into a fresh sharded model and optimizer,
    and train both 2 more steps: the resumed run must equal the live one bitwise."""
    import tempfile

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    mesh = init_device_mesh("cpu", (world_size,))
    directory = [tempfile.mkdtemp(prefix="sharpness-dcp-") if rank == 0 else None]
    dist.broadcast_object_list(directory, src=0)
    out = {}
    for name in ("sam", "aesam", "looksam"):
        live_net = sharded_model(mesh)
        live = PRESETS[name](live_net.parameters())
        first, rest = batches()[:3], batches()[3:]
        train(live_net, live, rank, world_size, first)
        expected = (live.steps, live.sam_steps, live.policy.state_dict()["step"])
        model_state, optim_state = get_state_dict(live_net, live)
        path = f"{directory[0]}/{name}"
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
        resumed_net = sharded_model(mesh)
        resumed = PRESETS[name](resumed_net.parameters())
        model_state, optim_state = get_state_dict(resumed_net, resumed)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(resumed_net, resumed, model_state_dict=state["model"], optim_state_dict=state["optim"])
        restored = (resumed.steps, resumed.sam_steps, resumed.policy.state_dict()["step"])
        train(live_net, live, rank, world_size, rest)
        train(resumed_net, resumed, rank, world_size, rest)
        out[name] = {
            "restored": restored,
            "expected": expected,
            "equal": torch.equal(full_parameters(live_net), full_parameters(resumed_net)),
        }
    return out


def spawn(world_size: int = 2) -> list[dict[str, Any]]:
    scenarios = {"presets": scenario_presets, "errors": scenario_errors, "dcp_resume": scenario_dcp_resume}
    return run_spawned(scenarios, world_size)
