"""Data parallelism for the training loop, on ``torch.distributed`` (DDP, launched by ``torchrun``).

The loop's side of data-parallel training (the optimizer's side is :mod:`sharpness.optim.distributed`):

- :func:`process_group` initialises the default process group from ``torchrun``'s environment (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): gloo on CPU, nccl on CUDA, each collective with a
  timeout (:data:`TIMEOUT_ENV`, 30 minutes by default), so a peer that stops answering is an error, never a hang.
- :func:`distribute` wraps the model in :class:`~torch.nn.parallel.DistributedDataParallel` when the group has
  several processes, or shards it with FSDP2 (``fully_shard``, :func:`shard_model`); the optimizer is then built
  around the wrapper (SAM's first pass needs DDP's ``no_sync``). :func:`full_state` and :func:`load_full_state` give
  a sharded run checkpoints of the same layout as an unsharded one.
- :func:`shard`: every process draws the same shuffled order of the *global* batches (same seed) and takes its
  contiguous part of each, so N processes see, step by step, the data that one process sees.
- :func:`all_reduce_sums` makes the training metrics global; :func:`agree` gives every process rank 0's choice.

Fault injection for tests: with ``SHARPNESS_TEST_EXIT_AT_STEP=RANK:STEP`` in the environment
(:data:`FAULT_ENV`), process ``RANK`` ends itself with ``os._exit(1)`` right after optimizer step ``STEP`` (as a
crashed or killed process would). Unset (the default) nothing is added to the loop.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from sharpness.train.callbacks import Callback

if TYPE_CHECKING:
    from sharpness.train.loop import StepOutput, Trainer

TIMEOUT_ENV = "SHARPNESS_COLLECTIVE_TIMEOUT"
"""Seconds a collective may wait for the other processes before it fails (default 1800)."""
FAULT_ENV = "SHARPNESS_TEST_EXIT_AT_STEP"
"""``RANK:STEP``: that process exits abruptly after that optimizer step (a test hook; unset by default)."""
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
"""The variables ``torchrun`` (and :func:`sharpness.experiments.launch.launch`) give every process."""


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_rank_zero() -> bool:
    """Whether this process writes the run's files: rank 0, or the only process."""
    return world()[0] == 0


def launched_by_torchrun() -> bool:
    """Whether this process is a worker started by ``torchrun`` / ``torch.distributed.run``."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def timeout() -> datetime.timedelta:
    """The collective timeout: :data:`TIMEOUT_ENV` seconds, default 30 minutes."""
    text = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {text!r}")
    return datetime.timedelta(seconds=seconds)


@contextlib.contextmanager
def process_group(device: str, threads: int | None = None) -> Iterator[None]:
    """Initialise the default process group for a ``torchrun`` worker, and destroy it at the end.

    Does nothing outside ``torchrun`` or with ``WORLD_SIZE`` 1. Otherwise: nccl for a CUDA ``device`` (each
    process on ``cuda:LOCAL_RANK``), gloo on CPU, where each process computes single-threaded unless ``threads``
    says otherwise (N processes share the machine's cores). A body that ends normally waits for the other
    processes before the group is destroyed.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        yield
        return
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    elif threads is None:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout())
    try:
        yield
        dist.barrier()  # no process leaves the group while another still works (rank 0's evaluation and files)
    finally:
        dist.destroy_process_group()


def replica_device(device: str | torch.device) -> torch.device:
    """The device of this process: under a group of several processes ``cuda`` means ``cuda:LOCAL_RANK``."""
    device = torch.device(device)
    if device.type != "cuda" or world()[1] == 1:
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", world()[0]))
    if device.index is not None and device.index != local_rank:
        raise ValueError(
            f"device {device} names one GPU, but each of the {world()[1]} processes uses its own: pass --device cuda "
            "(process i uses cuda:i)"
        )
    return torch.device("cuda", local_rank)


def distribute(model: nn.Module, device: str | torch.device, *, fsdp: bool = False) -> nn.Module:
    """``model`` on ``device``, wrapped in ``DistributedDataParallel`` when the default group has several processes.

    With ``fsdp=True`` the model is sharded with FSDP2 instead (:func:`shard_model`). A model that is already a
    ``DistributedDataParallel`` or FSDP2 module is returned as it is, and so is any model in a single process. DDP's
    defaults are kept: the buffers (BatchNorm statistics) are broadcast from rank 0 at every forward, so the
    replicas stay equal (the training loop does the same for a sharded model: :func:`sync_buffers`).
    """
    if isinstance(model, DistributedDataParallel) or is_sharded_module(model):
        return model
    device = torch.device(device)
    model = model.to(device)
    if world()[1] == 1:
        return model
    if fsdp:
        return shard_model(model)
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (any other module, FSDP2's included, as it is)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


# ----------------------------------------------------------------------------- FSDP2


def is_sharded_module(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by FSDP2's ``fully_shard`` (its parameters are ``DTensor`` shards)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return False
    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module) -> nn.Module:
    """Shard ``model`` (already on its device) over the default group with FSDP2, one unit per top-level child.

    Each direct child that holds parameters (a layer of an MLP, a stage of a ResNet) is its own ``fully_shard``
    unit, so only one unit's full parameters exist at a time in forward and backward; the root takes the rest.
    Buffers are not sharded: every process keeps its own copy (see :func:`sync_buffers`).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world()[1],))
    for child in model.children():
        if next(child.parameters(), None) is not None:
            fully_shard(child, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def sync_buffers(model: nn.Module) -> None:
    """Broadcast ``model``'s buffers (BatchNorm's running statistics) from rank 0, as DDP does before each forward.

    Under FSDP2 each process updates its copy of the buffers with its own shard of the batch; without this the
    replicas' running statistics would drift apart and evaluation would depend on the rank.
    """
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def full_state(model: nn.Module, optimizer: Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The full (unsharded) state dicts of a sharded ``model`` and its ``optimizer``, on rank 0's CPU.

    A collective: every process must call it; the other processes get empty dicts. The optimizer's state is
    returned in torch's own layout (parameters numbered in the order of its ``param_groups``), so a checkpoint of
    a sharded run is read like any other (and resumes with or without sharding, with any number of processes).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    if not optimizer_state:
        return model_state, optimizer_state
    index = {name: number for number, name in enumerate(_parameter_names(model, optimizer))}
    return model_state, _renumber(optimizer_state, index)


def load_full_state(
    model: nn.Module, optimizer: Optimizer, model_state: dict[str, Any], optimizer_state: dict[str, Any]
) -> None:
    """Load full state dicts (every process holds them, e.g. read from the same checkpoint) into a sharded model.

    The inverse of :func:`full_state`: each process keeps its own shards.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    names = dict(enumerate(_parameter_names(model, optimizer)))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=_renumber(optimizer_state, names),
        options=StateDictOptions(full_state_dict=True),
    )


def _parameter_names(model: nn.Module, optimizer: Optimizer) -> list[str]:
    """The fully qualified name of every parameter of ``optimizer``, in the order of its ``param_groups``."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def _renumber(state: dict[str, Any], key: dict[Any, Any]) -> dict[str, Any]:
    """An optimizer state dict with every parameter key (in ``state`` and the groups' ``params``) mapped by ``key``:
    numbers to names (torch's layout to ``torch.distributed.checkpoint``'s) or back."""
    groups = [{**group, "params": [key[param] for param in group["params"]]} for group in state["param_groups"]]
    return {**state, "state": {key[param]: value for param, value in state["state"].items()}, "param_groups": groups}


def check_global_batch(
    batch_size: int, world_size: int, *, micro_batch: int | None = None, n_examples: int | None = None
) -> None:
    """A one-line ``ValueError`` for a global batch that ``world_size`` processes cannot share.

    The batch must split evenly; ``micro_batch`` (m-sharpness in one process) does not apply, since each process's
    shard already is SAM's ``m``; and the last, smaller batch of an epoch of ``n_examples`` (when given) must
    leave every process at least one example.
    """
    if world_size == 1:
        return
    if batch_size % world_size:
        raise ValueError(
            f"the batch size {batch_size} (the global batch) is not divisible by the {world_size} processes; pass a "
            f"multiple of {world_size} as --batch-size"
        )
    if micro_batch is not None:
        raise ValueError(
            f"micro_batch (--micro-batch) is for one process: with {world_size} processes each one perturbs with its "
            f"own {batch_size // world_size} examples, which is m-sharpness with m = batch size / processes"
        )
    last = n_examples % batch_size if n_examples is not None else 0
    if 0 < last < world_size:
        raise ValueError(
            f"the last batch of an epoch has {last} examples ({n_examples} mod {batch_size}), fewer than the "
            f"{world_size} processes; choose a --batch-size that leaves none or at least {world_size}"
        )


def shard(x: Tensor, y: Tensor, rank: int, world_size: int) -> tuple[Tensor, Tensor]:
    """Process ``rank``'s contiguous part of a global batch (sizes differ by at most one example)."""
    if world_size == 1:
        return x, y
    return x.tensor_split(world_size)[rank], y.tensor_split(world_size)[rank]


def all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed over the processes (one all-reduce, float64); unchanged without a group."""
    if world()[1] == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def agree(value: Any) -> Any:
    """Rank 0's ``value`` on every process (a picklable object); ``value`` itself without a group."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every process of the default group gets here (nothing without a group)."""
    if world()[1] > 1:
        dist.barrier()


class ExitAtStep(Callback):
    """Test hook (see :data:`FAULT_ENV`): process ``rank`` exits with status 1, without cleanup, after ``step``."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_step_end(self, trainer: Trainer, step: StepOutput) -> None:
        if step.step == self.step and world()[0] == self.rank:
            os._exit(1)


def fault_callbacks() -> list[Callback]:
    """``[ExitAtStep(rank, step)]`` when :data:`FAULT_ENV` is ``RANK:STEP``; ``[]`` when it is unset."""
    text = os.environ.get(FAULT_ENV)
    if not text:
        return []
    rank, _, step = text.partition(":")
    if not (rank.isdigit() and step.isdigit()):
        raise ValueError(f"{FAULT_ENV} must be RANK:STEP, e.g. 1:5, got {text!r}")
    return [ExitAtStep(int(rank), int(step))]
