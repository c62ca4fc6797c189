"""Time one optimizer step of ``sharpness.SAM`` against ``pytorch_optimizer.SAM`` and plain SGD on CPU.

Contenders (each on its own deep copy of one initial model, all fed the same fixed batch):

* ``fwd_bwd``  -- forward, cross-entropy loss, backward, ``zero_grad(set_to_none=True)``: the bare gradient
  computation, so that every backward of every contender starts from ``grad=None``;
* ``sgd``      -- one forward/backward, ``opt.step()``, ``opt.zero_grad()`` (``torch.optim.SGD``, momentum
  0.9);
* ``ours``     -- ``sharpness.SAM`` with the two-step API: forward/backward, ``first_step(zero_grad=True)``,
  forward/backward, ``second_step(zero_grad=True)`` (base SGD, momentum 0.9, rho 0.05);
* ``po``       -- ``pytorch_optimizer.SAM`` used identically (its defaults; on CPU its ``foreach=None`` means
  a Python loop over the parameters).

Method. After a warm-up, every repeat runs one block of ``steps`` consecutive steps per contender, the
contenders taken round-robin and the starting contender rotated from repeat to repeat, so that slow phases of
the machine (other tenants, frequency changes) hit all contenders alike. A block is timed in the process's CPU
seconds (``time.process_time``; ``time.perf_counter`` on a GPU) with the garbage collector paused (as ``timeit``
does), so that time the virtual machine's CPU is taken away ("steal") does not count; the time per step is block
time / ``steps``. The report gives, per contender, the median over repeats and the interquartile range (IQR).
SAM's overhead beyond its two forward/backward passes is ``median(SAM step) - 2 * median(fwd_bwd)``, in ms and
as a percentage of the SAM step; "SAM-only" also takes away the base SGD update (``median(SGD step) -
median(fwd_bwd)``), leaving the cost of the perturbation, the norm and the restore themselves.

Two models: (a) "mlp": a deep plain MLP (122 ``nn.Linear`` layers, 244 small parameter tensors), where the
per-tensor cost of an optimizer dominates; (b) "cnn": a small conv net with BatchNorm on 3x32x32 inputs,
where the convolutions dominate. Targets: ours/po <= 0.90 on (a) and <= 1.02 on (b).

Before timing, a sanity check takes one SAM step with both implementations from identical weights on each
model and requires the same parameters and buffers (``pytorch_optimizer`` adds 1e-12 to the gradient norm and
accumulates the norm in float32, hence a tolerance).

Threads. The default is one intra-op thread (``--threads 0`` keeps torch's default, one per core). The step
overhead being measured is per-tensor work that does not parallelise, and on small shared VMs multi-threaded
OpenMP is erratic: on the 2-vCPU VM this was developed on, 2 threads made a forward/backward vary between
~10 ms and ~1000 ms (a stalled worker thread), while 1 thread gave steady times. Pass ``--threads 0`` (or
``--threads N``) on a machine with dedicated cores.

Everything (configuration, machine, raw per-repeat times, medians, ratios, targets) is written to a JSON file.

Run:  python benchmarks/bench_sam_step.py [--repeats R] [--steps N] [--threads T] [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_models import build_cnn
from pytorch_optimizer import SAM as POSAM
from torch import Tensor, nn

from sharpness import SAM

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CONTENDERS = ("fwd_bwd", "sgd", "ours", "po")
LR, MOMENTUM, RHO = 0.01, 0.9, 0.05
BATCH, CLASSES = 64, 10
TARGETS = {"mlp": 0.90, "cnn": 1.02}  # upper bounds on median(ours) / median(po)
SANITY_RTOL, SANITY_ATOL = 1e-5, 1e-6
TORCH_DEFAULT_THREADS = torch.get_num_threads()

Step = Callable[[], None]


@dataclass(frozen=True)
class Workload:
    """A model to benchmark, its fixed batch and its default number of steps per timed block."""

    name: str
    description: str
    model: nn.Module
    x: Tensor
    y: Tensor
    steps: int


# ------------------------------------------------------------------ models and data


def build_mlp(depth: int = 120, width: int = 32, in_features: int = 64) -> nn.Module:
    """A deep plain MLP: in -> width, ``depth`` hidden width x width layers with Tanh, width -> CLASSES.

    Orthogonal initialisation (gain 1) keeps activations and gradients O(1)-ish through 120 Tanh layers, so no
    denormal floats (which are very slow on CPU) appear in the timed passes.
    """
    layers: list[nn.Module] = [nn.Linear(in_features, width), nn.Tanh()]
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, CLASSES))
    model = nn.Sequential(*layers)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.orthogonal_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def build_workloads(seed: int, device: torch.device) -> list[Workload]:
    """Both models with their fixed batches on ``device``, built deterministically from ``seed``."""
    torch.manual_seed(seed)
    mlp, cnn = build_mlp().to(device), build_cnn(CLASSES).to(device)
    gen = torch.Generator().manual_seed(seed)
    mlp_x = torch.randn(BATCH, 64, generator=gen)
    cnn_x = torch.randn(BATCH, 3, 32, 32, generator=gen)
    y = torch.randint(0, CLASSES, (BATCH,), generator=gen).to(device)
    mlp_x, cnn_x = mlp_x.to(device), cnn_x.to(device)
    n_linear = sum(isinstance(m, nn.Linear) for m in mlp.modules())
    return [
        Workload("mlp", f"(a) deep MLP, {n_linear} Linear(<=64, 32) + Tanh", mlp, mlp_x, y, steps=100),
        Workload("cnn", "(b) CNN 3->32->64, BatchNorm, ReLU, maxpool, linear head", cnn, cnn_x, y, steps=15),
    ]


# ------------------------------------------------------------------ the contenders' steps


def loss_backward(model: nn.Module, x: Tensor, y: Tensor) -> None:
    F.cross_entropy(model(x), y).backward()


def make_step(contender: str, model: nn.Module, x: Tensor, y: Tensor) -> Step:
    """One step of ``contender`` on ``model`` (which it owns) with the batch ``(x, y)``."""
    params = list(model.parameters())
    if contender == "fwd_bwd":

        def fwd_bwd() -> None:
            loss_backward(model, x, y)
            model.zero_grad(set_to_none=True)

        return fwd_bwd
    if contender == "sgd":
        sgd = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)

        def sgd_step() -> None:
            loss_backward(model, x, y)
            sgd.step()
            sgd.zero_grad(set_to_none=True)

        return sgd_step
    sam_class = {"ours": SAM, "po": POSAM}[contender]
    sam = sam_class(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)

    def sam_step() -> None:
        loss_backward(model, x, y)
        sam.first_step(zero_grad=True)
        loss_backward(model, x, y)
        sam.second_step(zero_grad=True)

    return sam_step


# ------------------------------------------------------------------ sanity check


def state_max_abs_diff(a: nn.Module, b: nn.Module) -> tuple[float, bool]:
    """Max |a - b| over all floating-point parameters and buffers, and whether all are allclose."""
    max_diff, close = 0.0, True
    b_state = b.state_dict()
    for key, value in a.state_dict().items():
        if not value.is_floating_point():
            continue
        max_diff = max(max_diff, float((value - b_state[key]).abs().max()))
        close = close and torch.allclose(value, b_state[key], rtol=SANITY_RTOL, atol=SANITY_ATOL)
    return max_diff, close


def sanity_check(workloads: list[Workload]) -> dict[str, float]:
    """One SAM step of ours and of pytorch_optimizer's from the same weights must agree; returns max diff."""
    diffs: dict[str, float] = {}
    for work in workloads:
        ours_model, po_model = copy.deepcopy(work.model), copy.deepcopy(work.model)
        make_step("ours", ours_model, work.x, work.y)()
        make_step("po", po_model, work.x, work.y)()
        diffs[work.name], close = state_max_abs_diff(ours_model, po_model)
        moved, _ = state_max_abs_diff(ours_model, work.model)
        print(
            f"sanity {work.name}: one SAM step, max |ours - pytorch_optimizer| = {diffs[work.name]:.3e} "
            f"(weights moved by up to {moved:.3e})"
        )
        if not close or moved == 0.0:
            raise SystemExit(
                f"sanity check failed on {work.name}: ours and pytorch_optimizer's SAM disagree beyond "
                f"rtol={SANITY_RTOL}, atol={SANITY_ATOL} (max diff {diffs[work.name]:.3e}), or nothing moved"
            )
    return diffs


# ------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (CUDA runs asynchronously), so a block's time covers its own work only."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(step: Step, steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` consecutive steps, garbage collector paused: the process's CPU seconds on a
    CPU device (time the virtual machine's CPU was taken away, or spent on other work, does not count), wall-clock
    seconds on an accelerator (whose work the process's CPU time does not show)."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    gc.collect()
    gc.disable()
    try:
        synchronize(device)
        start = clock()
        for _ in range(steps):
            step()
        synchronize(device)
        return (clock() - start) / steps
    finally:
        gc.enable()


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3), inclusive method (exact for small samples)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def interleaved_times(
    step_fns: dict[str, Step], steps: int, repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Per contender, ms per step of each of ``repeats`` blocks of ``steps`` steps, after ``warmup`` steps each.

    The blocks are interleaved (one block of every contender per repeat) and the first contender rotates from repeat
    to repeat, so slow phases of the machine hit all contenders alike.
    """
    for step in step_fns.values():
        for _ in range(warmup):
            step()
    names = list(step_fns)
    raw: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            raw[name].append(time_block(step_fns[name], steps, device) * 1e3)
    return raw


def bench_workload(work: Workload, steps: int, repeats: int, warmup: int) -> dict[str, Any]:
    """Warm up, then ``repeats`` interleaved blocks per contender; per-step times in ms with summaries."""
    models = {name: copy.deepcopy(work.model) for name in CONTENDERS}
    step_fns = {name: make_step(name, models[name], work.x, work.y) for name in CONTENDERS}
    raw = interleaved_times(step_fns, steps, repeats, warmup, work.x.device)
    for name, model in models.items():  # a non-finite gradient would make SAM skip work: timings invalid
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise SystemExit(f"{work.name}/{name}: weights became non-finite during timing; lower LR")
    summary = {}
    for name, times in raw.items():
        q1, median, q3 = quartiles(times)
        summary[name] = {
            "median_ms": median,
            "q1_ms": q1,
            "q3_ms": q3,
            "iqr_ms": q3 - q1,
            "per_repeat_ms": times,
        }
    return summary


def overhead(sam_ms: float, fwd_bwd_ms: float, sgd_ms: float) -> dict[str, float]:
    """SAM step time beyond its two forward/backward passes, in ms and as % of the SAM step.

    ``sam_only_ms`` also takes away the base SGD update (``t(SGD step) - t(fwd+bwd)``), which both SAMs run
    unchanged: what is left is the cost of the perturbation, norm and restore themselves.
    """
    ms = sam_ms - 2.0 * fwd_bwd_ms
    return {"ms": ms, "percent_of_step": 100.0 * ms / sam_ms, "sam_only_ms": sam_ms - fwd_bwd_ms - sgd_ms}


def analyse(work: Workload, timings: dict[str, Any], steps: int) -> dict[str, Any]:
    """Medians, the ours/po ratio, overheads and the PASS/FAIL verdict for one workload."""
    med = {name: timings[name]["median_ms"] for name in CONTENDERS}
    paired = [o / p for o, p in zip(timings["ours"]["per_repeat_ms"], timings["po"]["per_repeat_ms"], strict=True)]
    ratio = med["ours"] / med["po"]
    return {
        "description": work.description,
        "param_tensors": len(list(work.model.parameters())),
        "params": sum(p.numel() for p in work.model.parameters()),
        "steps_per_block": steps,
        "timings": timings,
        "ours_over_po": ratio,
        "ours_over_po_paired_median": statistics.median(paired),
        "ours_overhead": overhead(med["ours"], med["fwd_bwd"], med["sgd"]),
        "po_overhead": overhead(med["po"], med["fwd_bwd"], med["sgd"]),
        "target_ours_over_po_max": TARGETS[work.name],
        "pass": ratio <= TARGETS[work.name],
    }


# ------------------------------------------------------------------ report


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_default_threads": TORCH_DEFAULT_THREADS,
        "torch": torch.__version__,
        "pytorch_optimizer": importlib.metadata.version("pytorch_optimizer"),
        "sharpness": importlib.metadata.version("sharpness"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def fmt_med(entry: dict[str, Any]) -> str:
    return f"{entry['median_ms']:.2f} ±{entry['iqr_ms'] / 2:.2f}"


def print_table(results: dict[str, dict[str, Any]]) -> None:
    headers = [
        "model",
        "param tensors",
        "fwd+bwd ms",
        "SGD step ms",
        "ours SAM ms",
        "PO SAM ms",
        "ours/PO",
        "ours overhead beyond 2 fwd/bwd",
        "PO overhead beyond 2 fwd/bwd",
        "SAM-only ms ours / PO",
    ]
    rows = []
    for name, res in results.items():
        t = res["timings"]
        ours, po = res["ours_overhead"], res["po_overhead"]
        rows.append(
            [
                name,
                str(res["param_tensors"]),
                fmt_med(t["fwd_bwd"]),
                fmt_med(t["sgd"]),
                fmt_med(t["ours"]),
                fmt_med(t["po"]),
                f"{res['ours_over_po']:.3f}",
                f"{ours['ms']:.2f} ms ({ours['percent_of_step']:.1f}%)",
                f"{po['ms']:.2f} ms ({po['percent_of_step']:.1f}%)",
                f"{ours['sam_only_ms']:.2f} / {po['sam_only_ms']:.2f}",
            ]
        )
    print_grid(headers, rows)
    for name, res in results.items():
        verdict = "PASS" if res["pass"] else "FAIL"
        print(
            f"target {name}: ours/PO = {res['ours_over_po']:.3f} <= {res['target_ours_over_po_max']:.2f}: "
            f"{verdict}  (median of per-repeat ratios {res['ours_over_po_paired_median']:.3f})"
        )


def print_grid(headers: list[str], rows: list[list[str]]) -> None:
    """A left-aligned ``|`` table of timing cells, with the note on what a cell shows."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print("\n" + line + "\n" + "-" * len(line))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print("(times: median per step over repeats ± half the interquartile range)\n")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


# ------------------------------------------------------------------ main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks per contender and model (15)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per timed block, all models (default: 100 for mlp, 15 for cnn)",
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps per contender (5)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help=f"torch.set_num_threads (default 1, see the module docstring); 0 keeps torch's "
        f"default ({TORCH_DEFAULT_THREADS} here)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batch (0)")
    parser.add_argument(
        "--device",
        type=torch.device,
        default=torch.device("cpu"),
        help="cpu (default; the targets are for CPU) or cuda[:N]: timed blocks are synchronised",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 3 repeats of 2 steps, 1 warm-up step; JSON to results/sam_step_quick.json",
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="output file (default: benchmarks/results/sam_step.json)"
    )
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps, args.warmup = 3, 2, 1
    if args.json is None:
        suffix = "" if args.device.type == "cpu" else f"_{args.device.type}"
        args.json = RESULTS_DIR / f"sam_step{suffix}{'_quick' if args.quick else ''}.json"
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.repeats < 1 or (args.steps is not None and args.steps < 1) or args.warmup < 0 or args.threads < 0:
        parser.error("--repeats and --steps must be >= 1, --warmup and --threads >= 0")
    return args


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    print(
        f"torch {machine['torch']}, threads: {machine['torch_threads']} (torch default "
        f"{TORCH_DEFAULT_THREADS}), {machine['cpu_model']} "
        f"({machine['cpu_count']} CPUs), {machine['platform']}"
    )
    if args.device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(args.device)
        print(f"device: {machine['gpu']}")
    workloads = build_workloads(args.seed, args.device)
    sanity = sanity_check(workloads)
    results = {}
    started = time.perf_counter()
    for work in workloads:
        steps = args.steps or work.steps
        print(f"timing {work.name}: {args.repeats} repeats x {steps} steps per contender ...", flush=True)
        results[work.name] = analyse(work, bench_workload(work, steps, args.repeats, args.warmup), steps)
    print(f"timed in {time.perf_counter() - started:.0f} s")
    print_table(results)
    write_json(
        args.json,
        {
            "benchmark": "sam_step",
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": {
                "repeats": args.repeats,
                "steps": args.steps,
                "warmup": args.warmup,
                "threads": args.threads,
                "seed": args.seed,
                "device": str(args.device),
                "quick": args.quick,
                "batch": BATCH,
                "lr": LR,
                "momentum": MOMENTUM,
                "rho": RHO,
                "contenders": list(CONTENDERS),
            },
            "machine": machine,
            "sanity_max_abs_diff": sanity,
            "results": results,
        },
    )
    print(f"\nwrote {args.json}")
    return 0 if all(res["pass"] for res in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
