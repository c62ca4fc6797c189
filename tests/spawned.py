"""Run test scenarios in spawned processes (gloo on CPU) with a hard deadline, so a failure cannot hang the suite."""

from __future__ import annotations

import datetime
import functools
import os
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Scenario = Callable[[int, int], Any]


def _worker(rank: int, world_size: int, port: int, out_dir: str, scenarios: dict[str, Scenario]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = {name: run(rank, world_size) for name, run in scenarios.items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@functools.cache
def _run(scenarios: tuple[tuple[str, Scenario], ...], world_size: int, timeout: float) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as out_dir:
        args = (world_size, _free_port(), out_dir, dict(scenarios))
        context = mp.start_processes(_worker, args=args, nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"the {world_size}-process run did not finish within {timeout:.0f} s")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def run_spawned(scenarios: dict[str, Scenario], world_size: int = 2, timeout: float = 240.0) -> list[dict[str, Any]]:
    """Run every scenario (module-level functions of ``(rank, world_size)``) on ``world_size`` ranks, once per
    process; each rank's results by scenario name. Raises if a rank fails or the deadline passes."""
    return _run(tuple(scenarios.items()), world_size, timeout)
