"""Data-parallel SAM: samples/s of 1 vs N processes at a fixed global batch, and gradient all-reduces per step.

Every process is spawned with ``torch.multiprocessing`` (gloo on CPU, nccl with ``--device cuda``), one torch
thread each on CPU, and runs a small CNN (two conv-BN-ReLU-maxpool stages, 3x32x32 inputs; 0.27 M parameters), a
model whose compute dominates its gradient all-reduce, at the global batch ``--batch`` split evenly over the ranks.

Contenders, each a ``DistributedDataParallel`` model (also with one process, so that the code path is the same):

* ``sgd``          -- ``torch.optim.SGD`` (momentum 0.9): one forward/backward, one all-reduce;
* ``sam``          -- ``sharpness.SAM(..., model=ddp)``: the first pass under ``no_sync()``, per-replica ε;
* ``sam_global``   -- ``sharpness.SAM(..., model=ddp, epsilon_from="global")``: the first pass all-reduced too;
* ``davda54``      -- davda54/sam's README recipe (only the first ``backward()`` under ``no_sync()``), with a SAM
  that is not told about DDP: DDP decides in ``forward`` whether to all-reduce, so it all-reduces twice.

Method: after a warm-up, ``--repeats`` blocks of ``--steps`` steps per contender, the contenders taken round-robin;
a block starts and ends with a barrier, its time is the slowest rank's; samples/s = global batch x steps / time,
median over blocks. All-reduces are counted with a DDP communication hook over one step. Throughput targets: with 2
processes on 2 cores, SAM >= 1.6x its 1-process throughput.

Run:  python benchmarks/bench_ddp.py [--nprocs 2] [--batch 128] [--steps 5] [--repeats 5] [--device cpu|cuda]
      [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from bench_models import build_cnn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from sharpness import SAM

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CONTENDERS = ("sgd", "sam", "sam_global", "davda54")
TARGET_SPEEDUP = 1.6
LR, MOMENTUM, RHO, CLASSES = 0.01, 0.9, 0.05, 10


def _optimizer(name: str, ddp: DistributedDataParallel) -> torch.optim.Optimizer:
    base = dict(lr=LR, momentum=MOMENTUM)
    if name == "sgd":
        return torch.optim.SGD(ddp.parameters(), **base)
    if name == "davda54":
        return SAM(ddp.parameters(), torch.optim.SGD, rho=RHO, **base)  # not told about DDP
    epsilon_from = "global" if name == "sam_global" else "replica"
    return SAM(ddp.parameters(), torch.optim.SGD, rho=RHO, model=ddp, epsilon_from=epsilon_from, **base)


def _step_fn(name: str, ddp: DistributedDataParallel, opt: torch.optim.Optimizer, x, y) -> Callable[[], None]:
    """One training step of contender ``name`` on this rank's shard ``(x, y)``."""

    def closure() -> torch.Tensor:
        loss = F.cross_entropy(ddp(x), y)
        loss.backward()
        return loss

    def sgd() -> None:
        closure()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def davda54() -> None:
        loss = F.cross_entropy(ddp(x), y)  # the recipe's forward is outside no_sync: DDP will all-reduce
        with ddp.no_sync():
            loss.backward()
        opt.first_step(zero_grad=True)
        closure()
        opt.second_step(zero_grad=True)

    if name == "sgd":
        return sgd
    if name == "davda54":
        return davda54
    return lambda: opt.step(closure)


def _count_allreduces(ddp: DistributedDataParallel, step: Callable[[], None]) -> int:
    calls = [0]

    def hook(state, bucket):  # unannotated: DDP checks the annotations, and these would be strings
        calls[0] += 1
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, hook)
    step()
    return calls[0]


def _timed_blocks(steps: dict[str, Callable[[], None]], args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per block of ``args.steps`` steps, per contender (the slowest rank's time)."""
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(args.repeats):
        order = list(steps)[repeat % len(steps) :] + list(steps)[: repeat % len(steps)]
        for name in order:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[name].append(float(elapsed))
    return times


def _ddp_cnn(device: torch.device, rank: int, args: argparse.Namespace) -> DistributedDataParallel:
    """The CNN (seeded: the same weights every time) wrapped in DDP on ``device``."""
    torch.manual_seed(0)
    return DistributedDataParallel(build_cnn(CLASSES).to(device), device_ids=[rank] if args.device == "cuda" else None)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 3, 32, 32, generator=gen)[rank::world].to(device)
        y = torch.randint(0, CLASSES, (args.batch,), generator=gen)[rank::world].to(device)
        steps, counts = {}, {}
        for name in CONTENDERS:
            counting = _ddp_cnn(device, rank, args)  # a separate model: the hook stays off the timed one
            counts[name] = _count_allreduces(counting, _step_fn(name, counting, _optimizer(name, counting), x, y))
            ddp = _ddp_cnn(device, rank, args)
            steps[name] = _step_fn(name, ddp, _optimizer(name, ddp), x, y)
        times = _timed_blocks(steps, args)
        if rank == 0:
            torch.save({"times": times, "allreduces": counts}, out)
    finally:
        dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace) -> dict[str, Any]:
    """Spawn ``world`` processes and return rank 0's times and all-reduce counts."""
    with socket.socket() as sock, tempfile.TemporaryDirectory() as tmp:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        out = os.path.join(tmp, "result.pt")
        mp.spawn(_worker, args=(world, port, args, out), nprocs=world, join=True)
        return torch.load(out, weights_only=True)


def summarize(results: dict[int, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """samples/s per world size and contender, the speed-ups and the all-reduce counts."""
    rows = {}
    for name in CONTENDERS:
        rate = {w: args.batch * args.steps / statistics.median(r["times"][name]) for w, r in results.items()}
        rows[name] = {
            "samples_per_s": rate,
            "speedup": rate[max(results)] / rate[1],
            "allreduces_per_step": results[max(results)]["allreduces"][name],
        }
    return rows


def print_table(rows: dict[str, Any], args: argparse.Namespace) -> None:
    worlds = sorted(next(iter(rows.values()))["samples_per_s"])
    header = " | ".join(
        [f"{'contender':11s}", *[f"{w} proc samples/s" for w in worlds], "speed-up", "all-reduces/step"]
    )
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        rates = [f"{row['samples_per_s'][w]:16.1f}" for w in worlds]
        print(" | ".join([f"{name:11s}", *rates, f"{row['speedup']:8.2f}", f"{row['allreduces_per_step']:16d}"]))
    verdict = "PASS" if rows["sam"]["speedup"] >= TARGET_SPEEDUP else "FAIL"
    print(
        f"\ntarget: {max(worlds)}-process SAM >= {TARGET_SPEEDUP}x 1-process: {rows['sam']['speedup']:.2f}x {verdict}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nprocs", type=int, default=2, help="processes of the parallel run (2)")
    parser.add_argument("--batch", type=int, default=128, help="global batch (128)")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block (5)")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per contender (5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender (2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process on CPU (1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="output JSON (default results/ddp[_quick].json)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 step x 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats, args.warmup = 1, 2, 1
    if args.batch % args.nprocs:
        parser.error(f"--batch {args.batch} is not divisible by --nprocs {args.nprocs}")
    return args


def main() -> int:
    args = parse_args()
    started = time.perf_counter()
    results = {world: run_world(world, args) for world in (1, args.nprocs)}
    rows = summarize(results, args)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} thread(s) per process, global batch {args.batch}, device {args.device}"
    )
    print_table(rows, args)
    path = args.json or RESULTS_DIR / ("ddp_quick.json" if args.quick else "ddp.json")
    payload = {
        "benchmark": "ddp",
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        "results": {
            name: {**row, "samples_per_s": {str(k): v for k, v in row["samples_per_s"].items()}}
            for name, row in rows.items()
        },
        "seconds": time.perf_counter() - started,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path} ({payload['seconds']:.0f} s)")
    return 0 if rows["sam"]["speedup"] >= TARGET_SPEEDUP else 1


if __name__ == "__main__":
    raise SystemExit(main())
