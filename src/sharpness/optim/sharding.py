"""SAM on sharded parameters (FSDP2's ``fully_shard``): local shards for the arithmetic, global reductions for norms.

Under ``torch.distributed.fsdp.fully_shard`` every parameter is a ``DTensor`` sharded over a 1-D device mesh, and
after ``backward`` its gradient is the *reduced* (mean over ranks) gradient, sharded the same way. SAM then works on
the local shards (``to_local()``, which alias the parameters' storage): the snapshot, the restore, ε and the ASAM
scaling are element-wise, so they are exact shard by shard. Only the reductions span the ranks: a norm of the local
shards is combined across ranks (``(Σ_r ||h_r||_q^q)^{1/q}``, or the maximum for ``q = ∞``) with one scalar
all-reduce, and so are the finiteness checks and p = 1's count of ties. Every rank therefore takes identical
decisions, and the perturbation is the one of the global (reduced) gradient: FSDP2 costs SAM two reduce-scatters per
step (one per backward), where per-replica ε would need the unreduced gradients that FSDP2 does not keep.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (FSDP2's parameters and gradients).

    Called for every parameter on every step: the class is looked up once (an ``import`` statement per call costs
    more than the check), and a tensor of a plain class is answered without it.
    """
    if type(tensor) in _PLAIN:
        return False
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(tensor, dtensor)


_PLAIN = (Tensor, torch.nn.Parameter)


def local_shard(tensor: Tensor) -> Tensor:
    """The tensor to compute on: a sharded (``DTensor``) tensor's local shard, which aliases its storage; any other
    tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


@functools.cache
def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor
        return None
    return DTensor


class ShardReduce:
    """Scalar reductions over the ranks that hold the shards of SAM's parameters (one process group)."""

    def __init__(self, group: Any, device: torch.device) -> None:
        self.group, self.device = group, device

    @classmethod
    def of(cls, param: Tensor) -> ShardReduce:
        """The reduction group of a sharded parameter (its 1-D device mesh)."""
        mesh = param.device_mesh
        if mesh.ndim != 1:
            raise ValueError(
                f"SAM supports parameters sharded over a 1-D device mesh (fully_shard), got a {mesh.ndim}-D mesh"
            )
        return cls(mesh.get_group(), param.to_local().device)

    def _all_reduce(self, value: float, op: dist.ReduceOp) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op, group=self.group)
        return float(tensor)

    def sum(self, value: float) -> float:
        """``Σ_r value_r``."""
        return self._all_reduce(value, dist.ReduceOp.SUM)

    def norm(self, local: float, ord: float) -> float:
        """The ``ord``-norm of the concatenated shards from each rank's ``ord``-norm of its own (inf/NaN spread)."""
        if math.isinf(ord):
            return self._all_reduce(math.inf if math.isnan(local) else local, dist.ReduceOp.MAX)
        power = float(torch.tensor(local, dtype=torch.float64) ** ord)  # inf, not an error, on overflow
        return self.sum(power) ** (1.0 / ord) if math.isfinite(local) else self.sum(local)

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        return self.sum(0.0 if flag else 1.0) == 0.0
