"""Runs of the SAM family under DistributedDataParallel, in processes that the tests spawn (gloo, CPU).

The scenarios are plain functions of ``(rank, world_size)``; :func:`spawn` runs them all (see ``spawned.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from spawned import run_spawned
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from sharpness import AESAM, MSAM, SAM, AELookSAM, LateSAM, LookSAM, PeriodicSAM, RandomSAM
from sharpness.optim.policy import Adaptive, Policy

STEPS = 6
BASE = dict(lr=0.05, momentum=0.9)
PRESETS: dict[str, Callable[..., SAM]] = {
    "sam": lambda ps, **kw: SAM(ps, torch.optim.SGD, rho=0.05, **BASE, **kw),
    "asam": lambda ps, **kw: SAM(ps, torch.optim.SGD, rho=0.5, adaptive=True, **BASE, **kw),
    "aesam": lambda ps, **kw: AESAM(ps, torch.optim.SGD, total_steps=STEPS, **BASE, **kw),
    "aelooksam": lambda ps, **kw: AELookSAM(ps, torch.optim.SGD, total_steps=STEPS, alpha=0.5, **BASE, **kw),
    "looksam": lambda ps, **kw: LookSAM(ps, torch.optim.SGD, k=2, alpha=0.5, **BASE, **kw),
    "randomsam": lambda ps, **kw: RandomSAM(ps, torch.optim.SGD, prob=0.5, seed=7, **BASE, **kw),
    "periodicsam": lambda ps, **kw: PeriodicSAM(ps, torch.optim.SGD, k=2, **BASE, **kw),
    "latesam": lambda ps, **kw: LateSAM(ps, torch.optim.SGD, start=0.5, total_steps=STEPS, **BASE, **kw),
    "lateaesam": lambda ps, **kw: LateSAM(
        ps, torch.optim.SGD, start=0.3, then=Adaptive(), total_steps=STEPS, **BASE, **kw
    ),
}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).double()


def batches(world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global batches; rank r's shard is rows r::world_size. Rank 1's inputs are 10x larger, so the replicas'
    local gradient norms differ strongly."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x = torch.randn(8 * world_size, 5, generator=gen, dtype=torch.float64)
        x[1::world_size] *= 10.0
        out.append((x, torch.randint(0, 3, (8 * world_size,), generator=gen)))
    return out


def shard(batch: tuple[torch.Tensor, torch.Tensor], rank: int, world_size: int):
    x, y = batch
    return x[rank::world_size], y[rank::world_size]


def closure_of(net: nn.Module, x: torch.Tensor, y: torch.Tensor, poison: bool = False) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        loss = nn.functional.cross_entropy(net(x), y) * (math.nan if poison else 1.0)
        loss.backward()
        return loss

    return closure


def flat_state(net: nn.Module) -> torch.Tensor:
    """The parameters, flat. (BatchNorm's running statistics are DDP's: rank 0's are broadcast at each forward.)"""
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


# ----------------------------------------------------------------------------- scenarios (run on every rank)


def scenario_presets(rank: int, world_size: int) -> dict[str, Any]:
    """Every preset with step(closure): final weights and buffers, AE-SAM's decisions and s_t."""
    out = {}
    for name, build in PRESETS.items():
        ddp = DistributedDataParallel(model())
        opt = build(ddp.parameters(), model=ddp)
        decisions = []
        for batch in batches(world_size):
            before = opt.sam_steps
            opt.step(closure_of(ddp, *shard(batch, rank, world_size)))
            decisions.append((opt.sam_steps - before, opt.statistics().get("s", math.nan)))
        g_v = [v.clone() for v in opt.reuse.g_v.values()] if opt.reuse is not None else []
        out[name] = {"state": flat_state(ddp.module), "decisions": decisions, "g_v": g_v}
    return out


def scenario_two_step(rank: int, world_size: int) -> dict[str, Any]:
    """The documented two-step loop under DDP (first pass under no_sync) for SAM and AE-SAM."""
    out = {}
    for name in ("sam", "aesam", "looksam"):
        ddp = DistributedDataParallel(model())
        opt = PRESETS[name](ddp.parameters(), model=ddp)
        for batch in batches(world_size):
            x, y = shard(batch, rank, world_size)
            with ddp.no_sync():
                nn.functional.cross_entropy(ddp(x), y).backward()
            if opt.wants_sam_step():
                opt.first_step(zero_grad=True)
                nn.functional.cross_entropy(ddp(x), y).backward()
                opt.second_step(zero_grad=True)
            else:
                opt.erm_step(zero_grad=True)
        out[name] = flat_state(ddp.module)
    return out


def scenario_non_finite(rank: int, world_size: int) -> dict[str, Any]:
    """A NaN in rank 1's first pass skips the step on every rank (no hang), and training goes on."""
    ddp = DistributedDataParallel(model())
    opt = PRESETS["aesam"](ddp.parameters(), model=ddp)
    data = batches(world_size)
    opt.step(closure_of(ddp, *shard(data[0], rank, world_size)))
    before = flat_state(ddp.module)
    opt.step(closure_of(ddp, *shard(data[1], rank, world_size), poison=rank == 1))
    skipped = torch.equal(before, flat_state(ddp.module)) and opt.steps == 1
    opt.step(closure_of(ddp, *shard(data[1], rank, world_size)))
    return {"skipped": skipped, "steps": opt.steps, "state": flat_state(ddp.module)}


def scenario_allreduce_counts(rank: int, world_size: int) -> dict[str, int]:
    """Gradient all-reduces per step, counted by a DDP communication hook."""
    counts = {}
    for name, make in {
        "sgd": lambda ps, ddp: torch.optim.SGD(ps, **BASE),
        "sam": lambda ps, ddp: SAM(ps, torch.optim.SGD, model=ddp, **BASE),
        "sam_global": lambda ps, ddp: SAM(ps, torch.optim.SGD, model=ddp, epsilon_from="global", **BASE),
        "aesam_erm": lambda ps, ddp: AESAM(ps, torch.optim.SGD, model=ddp, lambda2=50.0, total_steps=100, **BASE),
        "periodicsam_erm": lambda ps, ddp: PeriodicSAM(ps, torch.optim.SGD, model=ddp, k=2, **BASE),
        "lateaesam_erm": lambda ps, ddp: LateSAM(
            ps, torch.optim.SGD, model=ddp, then=Adaptive(), total_steps=4, **BASE
        ),
    }.items():
        ddp = DistributedDataParallel(model())
        calls = [0]

        def hook(state, bucket, calls=calls):
            calls[0] += 1
            return default_hooks.allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, hook)
        opt = make(ddp.parameters(), ddp)
        data = batches(world_size)
        opt.step(closure_of(ddp, *shard(data[0], rank, world_size)))  # step 0 (a SAM step for every preset)
        calls[0] = 0
        opt.step(closure_of(ddp, *shard(data[1], rank, world_size)))  # step 1: SAM, or ERM for the *_erm names
        counts[name] = calls[0]
    return counts


class _LocalPolicy(Policy):
    """A user policy that does not declare itself replica-consistent."""

    def _decide(self, sq_grad_norm: float) -> bool:
        return True


def scenario_dcp_resume(rank: int, world_size: int) -> dict[str, Any]:
    """Every preset under DDP: 3 steps, a save through torch.distributed.checkpoint (``get_state_dict`` of the DDP
    module and SAM, ``dcp.save``), a load into a fresh DDP model and optimizer, and 3 more steps of both: the
    resumed run must equal the live one bitwise, with SAM's counters and policy state restored."""
    import tempfile

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    directory = [tempfile.mkdtemp(prefix="sharpness-dcp-") if rank == 0 else None]
    dist.broadcast_object_list(directory, src=0)
    out = {}
    for name, build in PRESETS.items():
        live_ddp = DistributedDataParallel(model())
        live = build(live_ddp.parameters(), model=live_ddp)
        first, rest = batches(world_size)[:3], batches(world_size)[3:]
        for batch in first:
            live.step(closure_of(live_ddp, *shard(batch, rank, world_size)))
        expected = (live.steps, live.sam_steps, live.policy.state_dict())
        model_state, optim_state = get_state_dict(live_ddp, live)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=f"{directory[0]}/{name}")
        resumed_ddp = DistributedDataParallel(model())
        resumed = build(resumed_ddp.parameters(), model=resumed_ddp)
        model_state, optim_state = get_state_dict(resumed_ddp, resumed)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=f"{directory[0]}/{name}")
        set_state_dict(resumed_ddp, resumed, model_state_dict=state["model"], optim_state_dict=state["optim"])
        restored = (resumed.steps, resumed.sam_steps, resumed.policy.state_dict())
        for batch in rest:
            live.step(closure_of(live_ddp, *shard(batch, rank, world_size)))
            resumed.step(closure_of(resumed_ddp, *shard(batch, rank, world_size)))
        out[name] = {
            "restored": restored,
            "expected": expected,
            "equal": torch.equal(flat_state(live_ddp.module), flat_state(resumed_ddp.module)),
            "trained": not torch.equal(flat_state(live_ddp.module), flat_state(model())),
        }
    return out


def plain_model() -> nn.Module:
    """Without BatchNorm, whose batch statistics would differ between a replica's shard and the whole batch."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def msam_of(params: Any, base: str) -> MSAM:
    options = dict(lr=0.05, momentum=0.9) if base == "sgd" else dict(lr=0.01)
    return MSAM(params, base, rho=0.5, rho_warmup=2, **options)


def scenario_msam(rank: int, world_size: int) -> dict[str, Any]:
    """MSAM (SGD and AdamW bases) on a DDP model: one all-reduce per step, as for the base; the weights between steps
    (at w̃) and inside ``unperturbed()`` (at w)."""
    out = {}
    for base in ("sgd", "adamw"):
        ddp = DistributedDataParallel(plain_model())
        opt = msam_of(ddp.parameters(), base)
        for batch in batches(world_size):
            opt.step(closure_of(ddp, *shard(batch, rank, world_size)))
        with opt.unperturbed():
            weights = flat_state(ddp.module)
        out[base] = {"perturbed": flat_state(ddp.module), "weights": weights}
    return out


def scenario_construction_errors(rank: int, world_size: int) -> dict[str, str]:
    """A policy that could desynchronise the replicas is an error at construction."""
    ddp = DistributedDataParallel(model())
    try:
        SAM(ddp.parameters(), torch.optim.SGD, model=ddp, policy=_LocalPolicy(), lr=0.1)
    except ValueError as error:
        return {"custom_policy": str(error)}
    return {"custom_policy": ""}


SCENARIOS = {
    "construction_errors": scenario_construction_errors,
    "presets": scenario_presets,
    "two_step": scenario_two_step,
    "non_finite": scenario_non_finite,
    "allreduce_counts": scenario_allreduce_counts,
    "dcp_resume": scenario_dcp_resume,
    "msam": scenario_msam,
}


def spawn(world_size: int = 2) -> list[dict[str, Any]]:
    """Every scenario of this module on ``world_size`` ranks; each rank's results."""
    return run_spawned(SCENARIOS, world_size)
