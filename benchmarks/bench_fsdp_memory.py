"""Memory per rank of SAM on FSDP2 (``fully_shard``) against DDP, and the collectives of one SAM step.

Two processes (gloo on CPU; nccl with ``--device cuda``) train an MLP of ``--width`` x ``--depth`` (4.2 M
parameters by default) with SAM around SGD-momentum, for a few steps, once wrapped in ``DistributedDataParallel``
(every rank holds the full weights, gradients, momentum and SAM's weight snapshot) and once sharded with
``fully_shard`` per layer (every rank holds its half of each, plus the layer being all-gathered).

Memory, per rank: the training state it holds after the steps, counted tensor by tensor (its local shards of the
weights and gradients, the base optimizer's state, SAM's weight snapshot); and the growth of the peak memory from
just before the model is built (on CPU the peak resident set size ``ru_maxrss``, which includes the allocator's
slack and the transient activations and all-gather buffers; on CUDA ``torch.cuda.max_memory_allocated``).
Collectives: counted over the last SAM step by wrapping ``torch.distributed``'s functions (DDP's gradient
all-reduces are also counted in its communication hook). The scalar all-reduces are SAM's own (norms, finiteness).

Run:  python benchmarks/bench_fsdp_memory.py [--width 1024] [--depth 4] [--steps 3] [--device cpu|cuda]
      [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import socket
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from sharpness import SAM

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COUNTED = (
    "all_reduce",
    "all_gather_single",
    "reduce_scatter_single",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
)


def build_mlp(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def _peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _wrap(kind: str, net: nn.Module, device: str, rank: int) -> nn.Module:
    if kind == "ddp":
        return DistributedDataParallel(net, device_ids=[rank] if device == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (dist.get_world_size(),))
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(net, mesh=mesh)


class _Counting:
    """Counts calls of torch.distributed's collectives (and DDP's hook) while active."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.active = False
        self._originals = {name: getattr(dist, name) for name in COUNTED}

    def __enter__(self) -> _Counting:
        for name, original in self._originals.items():
            setattr(dist, name, self._counted(name, original))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)

    def _counted(self, name: str, original: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                self.counts[name] += 1
            return original(*args, **kwargs)

        return call

    def hook(self, state, bucket):  # unannotated: DDP checks the annotations, and these would be strings
        if self.active:
            self.counts["all_reduce (DDP hook)"] += 1
        return default_hooks.allreduce_hook(state, bucket)


def _run(kind: str, args: argparse.Namespace, rank: int) -> dict[str, Any]:
    device = f"cuda:{rank}" if args.device == "cuda" else "cpu"
    torch.manual_seed(0)
    before = _peak_mb(args.device)
    net = _wrap(kind, build_mlp(args.width, args.depth).to(device), args.device, rank)
    counting = _Counting()
    if kind == "ddp":
        net.register_comm_hook(None, counting.hook)
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9, model=net if kind == "ddp" else None)
    x = torch.randn(args.batch, args.width, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def closure() -> torch.Tensor:
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    with counting:
        for step in range(args.steps):
            counting.active = step == args.steps - 1  # the last step (the first ones build buffers and state)
            opt.step(closure)
    params = sum(p.numel() for p in build_mlp(args.width, args.depth).parameters())
    return {
        "state_mb": _state_mb(opt),
        "peak_mb": _peak_mb(args.device) - before,
        "collectives": dict(counting.counts),
        "params": params,
    }


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _state_mb(opt: SAM) -> float:
    """Bytes this rank holds of weights, gradients, the base optimizer's state and SAM's snapshot, in MB."""
    params = [p for group in opt.param_groups for p in group["params"]]
    tensors = [_local(p) for p in params] + [_local(p.grad) for p in params if p.grad is not None]
    tensors += [_local(v) for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
    tensors += [copy for snapshot in opt._snapshots.values() for copy in snapshot._copies]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _worker(rank: int, world: int, port: int, kind: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if args.device == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    try:
        result = _run(kind, args, rank)
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def measure(kind: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One fresh pair of processes per kind, so that the peak RSS of one does not carry into the other."""
    with socket.socket() as sock, tempfile.TemporaryDirectory() as tmp:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        out = os.path.join(tmp, "result")
        mp.spawn(_worker, args=(args.nprocs, port, kind, args, out), nprocs=args.nprocs, join=True)
        return [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(args.nprocs)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32, help="per-rank batch (32)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "fsdp_memory.json")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    results = {kind: measure(kind, args) for kind in ("ddp", "fsdp2")}
    params = results["ddp"][0]["params"]
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.nprocs} ranks, "
        f"device {args.device}; MLP {args.width}x{args.depth}: {params / 1e6:.2f} M parameters "
        f"({params * 4 / 2**20:.1f} MB in float32)"
    )
    header = ["wrapper", "state per rank (MB)", "peak growth per rank (MB)", "collectives in one SAM step"]
    print(f"{header[0]:7s} | {header[1]:>19s} | {header[2]:>25s} | {header[3]}")
    for kind, ranks in results.items():
        states = " / ".join(f"{r['state_mb']:.1f}" for r in ranks)
        peaks = " / ".join(f"{r['peak_mb']:.0f}" for r in ranks)
        collectives = ", ".join(f"{name} {count}" for name, count in sorted(ranks[0]["collectives"].items()))
        print(f"{kind:7s} | {states:>19s} | {peaks:>25s} | {collectives}")
    ratio = max(r["state_mb"] for r in results["fsdp2"]) / max(r["state_mb"] for r in results["ddp"])
    peak_ratio = max(r["peak_mb"] for r in results["fsdp2"]) / max(r["peak_mb"] for r in results["ddp"])
    print(f"FSDP2 / DDP: training state {ratio:.2f}, peak growth {peak_ratio:.2f}")
    payload = {
        "benchmark": "fsdp_memory",
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        "results": results,
        "fsdp2_over_ddp": {"state": ratio, "peak": peak_ratio},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0  # a measurement without a pass/fail target


if __name__ == "__main__":
    raise SystemExit(main())
