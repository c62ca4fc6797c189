"""Cost of an ERM step of every switching preset against a plain SGD step (the "≈ SGD cost" promise).

A switching policy (PeriodicSAM, RandomSAM, LookSAM, AE-SAM, AE-LookSAM, LateSAM) takes most of its steps without
the second pass; such an ERM step must cost no more than ``TARGET`` × a plain ``torch.optim.SGD`` step (issue 14):
its extra work is the policy's decision (AE-SAM: ``||g||²``, one host synchronisation), LookSAM's reuse of ``g_v``
and SAM's bookkeeping. Each contender trains its own copy of the 244-tensor MLP of ``bench_sam_step.py`` on one
fixed batch with ``opt.step(closure)`` (SGD: the same closure, one call); the presets are configured so that every
timed step is an ERM step (checked: no SAM step is taken during timing, except LookSAM's first step, which is in the
warm-up). Contenders are timed in interleaved blocks, the starting one rotated per repeat; the statistic is the
median over repeats of the per-step time, and the verdict is median(preset) / median(SGD) <= ``TARGET``.

    python benchmarks/bench_erm_step.py [--repeats 15] [--steps 100] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_sam_step import BATCH, CLASSES, LR, MOMENTUM, build_mlp, interleaved_times, machine_info, quartiles
from torch import nn

import sharpness
from sharpness.optim.registry import OPTIMIZERS

RESULTS = Path(__file__).resolve().parent / "results" / "erm_step.json"
TARGET = 1.05
NEVER = 10**9  # a period / start no benchmark reaches: every timed step is an ERM step
PRESETS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM),
    "periodicsam": lambda m: sharpness.PeriodicSAM(m.parameters(), torch.optim.SGD, k=NEVER, lr=LR, momentum=MOMENTUM),
    "randomsam": lambda m: sharpness.RandomSAM(m.parameters(), torch.optim.SGD, prob=0.0, lr=LR, momentum=MOMENTUM),
    "looksam": lambda m: sharpness.LookSAM(m.parameters(), torch.optim.SGD, k=NEVER, lr=LR, momentum=MOMENTUM),
    # AE-SAM's threshold c_t = λ: a huge λ makes every step an ERM step, with the statistics still computed
    "aesam": lambda m: sharpness.AESAM(
        m.parameters(), torch.optim.SGD, total_steps=NEVER, lambda1=1e9, lambda2=1e9, lr=LR, momentum=MOMENTUM
    ),
    "aelooksam": lambda m: sharpness.AELookSAM(
        m.parameters(), torch.optim.SGD, total_steps=NEVER, lambda1=1e9, lambda2=1e9, lr=LR, momentum=MOMENTUM
    ),
}
if "latesam" in OPTIMIZERS:  # LateSAM before its start

    def _late(m: nn.Module) -> torch.optim.Optimizer:
        opt = sharpness.LateSAM(m.parameters(), torch.optim.SGD, start=0.99, lr=LR, momentum=MOMENTUM)
        opt.set_total_steps(NEVER)
        return opt

    PRESETS["latesam"] = _late


def make_step(opt: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return lambda: opt.step(closure)


def bench(repeats: int, steps: int, warmup: int) -> dict[str, Any]:
    torch.manual_seed(0)
    base = build_mlp()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, 64, generator=gen), torch.randint(0, CLASSES, (BATCH,), generator=gen)
    models = {name: copy.deepcopy(base) for name in PRESETS}
    opts = {name: build(models[name]) for name, build in PRESETS.items()}
    steps_fn = {name: make_step(opts[name], models[name], x, y) for name in PRESETS}
    for step in steps_fn.values():  # LookSAM's first step is a SAM step (no g_v yet): it is in the warm-up
        step()
    sam_before = {name: getattr(opt, "sam_steps", 0) for name, opt in opts.items()}
    raw = interleaved_times(steps_fn, steps, repeats, warmup, x.device)
    for name, opt in opts.items():
        if getattr(opt, "sam_steps", 0) != sam_before[name]:
            raise SystemExit(f"{name} took a SAM step while timed: the ERM figures would be wrong")
    result = {}
    for name, times in raw.items():
        q1, median, q3 = quartiles(times)
        result[name] = {"median_ms": median, "q1_ms": q1, "q3_ms": q3, "per_repeat_ms": times}
    for name in PRESETS:
        result[name]["x_sgd"] = result[name]["median_ms"] / result["sgd"]["median_ms"]
        result[name]["verdict"] = "-" if name == "sgd" else ("PASS" if result[name]["x_sgd"] <= TARGET else "FAIL")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=100, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = bench(args.repeats, args.steps, args.warmup)
    print(f"ERM step vs SGD step, 244-tensor MLP, batch {BATCH}, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'optimizer':<12} {'CPU ms':>10} {'IQR ms':>14} {'× SGD':>7}  target <= {TARGET}")
    for name, entry in result.items():
        iqr = f"{entry['q1_ms']:.2f}-{entry['q3_ms']:.2f}"
        print(f"{name:<12} {entry['median_ms']:>10.3f} {iqr:>14} {entry['x_sgd']:>7.3f}  {entry['verdict']}")
    payload = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {**vars(args), "json": str(args.json), "target": TARGET},
        "results": result,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 1 if any(entry["verdict"] == "FAIL" for entry in result.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
