"""What SAM needs from data parallelism: per-replica first passes and a few collectives that keep replicas equal.

Data-parallel SAM as the paper ran it (Foret et al. 2021, §4.1 and App. C.3: m-sharpness with m = the per-replica
batch) perturbs each replica with the gradient of *its own* batch shard and averages the gradients taken at the
perturbed points. Under :class:`~torch.nn.parallel.DistributedDataParallel` this means the first pass (forward
**and** backward: DDP decides in ``forward`` whether the backward all-reduces) runs under ``ddp.no_sync()`` and only
the second pass all-reduces: one gradient all-reduce per SAM step, as for an SGD step.

The replicas must stay bitwise identical, so every decision that depends on a local quantity is taken from a global
one: the first gradient's finiteness and AE-SAM's ``s_t`` come from one scalar all-reduce (``s_t`` is the mean over
replicas of ``||g_r||²``), an ERM step after a local first pass averages the gradients itself (one all-reduce per
dtype), LookSAM's ``g_v`` is averaged over replicas, and a random policy's generator is broadcast from rank 0.

``epsilon_from="global"`` keeps DDP's default instead: the first pass is all-reduced too (two all-reduces per SAM
step), every replica perturbs with the global gradient, and nothing else needs a collective.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from sharpness.checks import check_choice

EpsilonFrom = Literal["replica", "global"]
EPSILON_FROM = ("replica", "global")


class ReplicaSync:
    """The collectives of data-parallel SAM over ``ddp``'s process group (see the module docstring)."""

    def __init__(self, ddp: DistributedDataParallel, epsilon_from: EpsilonFrom) -> None:
        self.ddp = ddp
        self.epsilon_from = check_choice(epsilon_from, "epsilon_from", EPSILON_FROM, owner="SAM")
        self.group = ddp.process_group
        self.world_size = dist.get_world_size(self.group)

    @property
    def local_first_pass(self) -> bool:
        """Whether the first pass runs without all-reduce (each replica perturbs with its own gradient)."""
        return self.epsilon_from == "replica"

    def first_pass(self) -> contextlib.AbstractContextManager[Any]:
        """The context the first (unperturbed) pass runs in: ``no_sync()`` for per-replica ε."""
        return self.ddp.no_sync() if self.local_first_pass else contextlib.nullcontext()

    def _device(self, like: Tensor | None) -> torch.device:
        if like is not None:
            return like.device
        return next(self.ddp.module.parameters()).device

    def mean(self, value: float, like: Tensor | None = None) -> float:
        """The mean over replicas of a Python float (inf/NaN on any replica make it inf/NaN everywhere)."""
        tensor = torch.tensor([value], dtype=torch.float64, device=self._device(like))
        dist.all_reduce(tensor, group=self.group)
        return float(tensor) / self.world_size

    def average(self, tensors: Sequence[Tensor]) -> None:
        """Replace ``tensors`` by their mean over replicas, in place: one all-reduce per dtype."""
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        for same_dtype in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in same_dtype])
            dist.all_reduce(flat, group=self.group)
            flat.div_(self.world_size)
            pieces = flat.split([t.numel() for t in same_dtype])
            torch._foreach_copy_(same_dtype, [piece.view_as(t) for piece, t in zip(pieces, same_dtype, strict=True)])

    def broadcast_generator(self, generator: torch.Generator) -> None:
        """Give every replica rank 0's random state (a random policy then draws the same on every replica)."""
        state = [generator.get_state()]
        dist.broadcast_object_list(state, src=dist.get_global_rank(self.group, 0), group=self.group)
        generator.set_state(state[0])


def replica_sync(model: nn.Module | None, epsilon_from: EpsilonFrom) -> ReplicaSync | None:
    """A :class:`ReplicaSync` when ``model`` is a DDP module in a group of several processes, else ``None``."""
    check_choice(epsilon_from, "epsilon_from", EPSILON_FROM, owner="SAM")
    if not isinstance(model, DistributedDataParallel):
        return None
    sync = ReplicaSync(model, epsilon_from)
    return sync if sync.world_size > 1 else None
