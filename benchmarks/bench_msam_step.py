"""Time one ``sharpness.MSAM`` step against the plain step of its base optimizer (SGD-momentum, AdamW) on CPU.

MSAM (Becker et al., 2024) takes one forward/backward pass per step, like its base; what it adds is bookkeeping:
the finiteness check of the gradient, restoring the stored ``w``, the global norm of the momentum, storing ``w``
again and the perturbation ``w̃ = w − ρ v/||v||``. Target: an MSAM step <= 1.05x the plain SGD-momentum step.

Contenders (each on its own deep copy of one initial model, all fed the same fixed batch; every step is
forward, cross-entropy, backward, ``opt.step()``, ``opt.zero_grad(set_to_none=True)``):

* ``fwd_bwd``    -- the forward/backward alone (no optimizer);
* ``sgd``        -- ``torch.optim.SGD`` (momentum 0.9);
* ``msam``       -- ``sharpness.MSAM(base="sgd")`` (momentum 0.9, rho 0.3);
* ``sgd_fe``, ``msam_fe`` -- the same with ``foreach=True`` (torch's multi-tensor SGD; on CPU torch's
  default is the per-tensor loop): the bookkeeping against a base that is itself multi-tensor;
* ``adamw``      -- ``torch.optim.AdamW``;
* ``msam_adamw`` -- ``sharpness.MSAM(base="adamw")`` (rho 1).

Method, models and threads as in ``bench_sam_step.py`` (whose helpers this script uses): the deep MLP with 244
small parameter tensors (per-tensor work dominates: the worst case for MSAM's bookkeeping) and the small CNN
(convolutions dominate). Round-robin blocks with the first contender rotated, the garbage collector paused,
the median per step over repeats; the ratios are taken within the run. One intra-op thread by default.

Run:  python benchmarks/bench_msam_step.py [--repeats R] [--steps N] [--threads T] [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_sam_step import (
    LR,
    MOMENTUM,
    RESULTS_DIR,
    TORCH_DEFAULT_THREADS,
    Workload,
    build_workloads,
    interleaved_times,
    loss_backward,
    machine_info,
    print_grid,
    quartiles,
    write_json,
)
from torch import Tensor, nn

from sharpness import MSAM

CONTENDERS = ("fwd_bwd", "sgd", "msam", "sgd_fe", "msam_fe", "adamw", "msam_adamw")
PAIRS = (("msam", "sgd"), ("msam_fe", "sgd_fe"), ("msam_adamw", "adamw"))
"""(MSAM, its base): the ratios reported."""
TARGET = 1.05  # upper bound on median(msam) / median(sgd)
ADAMW_LR = 1e-3


def build_optimizer(contender: str, params: list[Tensor]) -> torch.optim.Optimizer:
    foreach = {"foreach": True} if contender.endswith("_fe") else {}
    if contender.startswith("sgd"):
        return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, **foreach)
    if contender in ("msam", "msam_fe"):
        return MSAM(params, "sgd", 0.3, lr=LR, momentum=MOMENTUM, **foreach)
    if contender == "adamw":
        return torch.optim.AdamW(params, lr=ADAMW_LR)
    return MSAM(params, "adamw", 1.0, lr=ADAMW_LR)


def make_step(contender: str, model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    """One step of ``contender`` on ``model`` (which it owns) with the batch ``(x, y)``."""
    if contender == "fwd_bwd":

        def fwd_bwd() -> None:
            loss_backward(model, x, y)
            model.zero_grad(set_to_none=True)

        return fwd_bwd
    opt = build_optimizer(contender, list(model.parameters()))

    def step() -> None:
        loss_backward(model, x, y)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_workload(work: Workload, steps: int, repeats: int, warmup: int) -> dict[str, Any]:
    """Warm up, then ``repeats`` interleaved blocks per contender; medians, IQRs and the MSAM/base ratios."""
    models = {name: copy.deepcopy(work.model) for name in CONTENDERS}
    step_fns = {name: make_step(name, models[name], work.x, work.y) for name in CONTENDERS}
    raw = interleaved_times(step_fns, steps, repeats, warmup, work.x.device)
    for name, model in models.items():
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise SystemExit(f"{work.name}/{name}: weights became non-finite during timing")
    timings = {}
    for name, times in raw.items():
        q1, median, q3 = quartiles(times)
        timings[name] = {"median_ms": median, "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "per_repeat_ms": times}
    ratios = {f"{a}/{b}": timings[a]["median_ms"] / timings[b]["median_ms"] for a, b in PAIRS}
    return {
        "description": work.description,
        "param_tensors": len(list(work.model.parameters())),
        "steps_per_block": steps,
        "timings": timings,
        "ratios": ratios,
        "msam_overhead_ms": timings["msam"]["median_ms"] - timings["sgd"]["median_ms"],
        "target_msam_over_sgd_max": TARGET,
        "pass": ratios["msam/sgd"] <= TARGET,
    }


def print_table(results: dict[str, dict[str, Any]]) -> None:
    headers = ["model", "tensors", *(f"{name} ms" for name in CONTENDERS), *(f"{a}/{b}" for a, b in PAIRS)]
    rows = []
    for name, res in results.items():
        t = res["timings"]
        cells = [f"{t[c]['median_ms']:.2f} ±{t[c]['iqr_ms'] / 2:.2f}" for c in CONTENDERS]
        rows.append([name, str(res["param_tensors"]), *cells, *(f"{r:.3f}" for r in res["ratios"].values())])
    print_grid(headers, rows)
    for name, res in results.items():
        verdict = "PASS" if res["pass"] else "FAIL"
        print(
            f"target {name}: msam/sgd = {res['ratios']['msam/sgd']:.3f} <= {TARGET:.2f}: {verdict} "
            f"(+{res['msam_overhead_ms']:.3f} ms per step)"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks per contender and model (15)")
    parser.add_argument("--steps", type=int, default=None, help="steps per block (default: 100 mlp, 15 cnn)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps per contender (5)")
    parser.add_argument(
        "--threads", type=int, default=1, help=f"torch.set_num_threads (1; 0: torch's {TORCH_DEFAULT_THREADS})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batch (0)")
    parser.add_argument(
        "--json", type=Path, default=None, help="output JSON path (default results/msam_step.json; _quick with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="3 repeats of 10 steps: a smoke run")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.quick:
        args.repeats, args.steps, args.warmup = 3, 10, 2
    if args.json is None:  # a smoke run never overwrites a full result
        args.json = RESULTS_DIR / ("msam_step_quick.json" if args.quick else "msam_step.json")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    results = {}
    for work in build_workloads(args.seed, torch.device("cpu")):
        steps = args.steps or work.steps
        print(f"timing {work.name}: {args.repeats} repeats x {steps} steps per contender ...", flush=True)
        results[work.name] = bench_workload(work, steps, args.repeats, args.warmup)
    print_table(results)
    payload = {
        "benchmark": "bench_msam_step",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {**{k: str(v) for k, v in vars(args).items()}, "contenders": CONTENDERS, "lr": LR},
        "machine": machine_info(),
        "results": results,
    }
    write_json(args.json, payload)
    print(f"wrote {args.json}")
    return 0 if all(res["pass"] for res in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
