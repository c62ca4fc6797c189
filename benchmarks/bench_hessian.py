"""Hessian measurements against PyHessian, curvlinops and hessian-eigenthings: λ_max, top-5, products, trace, density.

Workloads (CPU, float32, one fixed batch of 512 MNIST-1D training examples, eval mode): the CLI's ``cnn1d``
(8k parameters) and an MLP 40-256-256-10 (79k parameters). References: our block Lanczos on a float64 copy of the
model with tolerance 1e-10 and block size 5 (every pair certified): the 5 largest and the 5 smallest eigenvalues.
Seconds are the process's CPU seconds (``time.process_time``) with one torch thread, wall-clock with more. Sections:

1. **λ_max** (relative accuracy 1e-3). Contenders, each timed from scratch (operator or ``hessian`` object built
   inside the timing, so both pay for building the gradient graph once), interleaved, medians over the repeats:
   ``top_eigenvalues(HessianOperator(...), k=1, tol=τ)`` (relative Ritz residual τ), the same with
   ``criterion="eigenvalue"``, ``power_iteration(op, tol=τ)`` (PyHessian's stopping rule) and PyHessian's
   ``hessian(model, criterion, data=batch, cuda=False).eigenvalues(maxIter=100, tol=τ)``. Each runs at the loosest
   τ of its ladder whose worst relative error over the ``--repeats`` seeds (the seeds then timed) is ≤ 1e-3
   (PyHessian's default τ = 1e-3 is not enough: it bounds the change between iterations, not the error). HVPs
   counted (ours: ``num_matvecs``; PyHessian: calls of its ``hessian_vector_product``). Targets: Lanczos (the
   faster criterion) at ≤ 1/3 of PyHessian's HVPs and ≤ 0.5× its time.
2. **Top-5 eigenvalues** at 1e-4 relative accuracy (the worst of the 5 relative errors over all seeds). Every
   contender climbs a ladder of settings, loosest first, running every seed at each, until it reaches its goal;
   HVPs and seconds are the medians over the seeds at the chosen setting (timed in the ladder itself, not
   interleaved: the target is about HVPs and accuracy). Contenders:

   - PyHessian ``eigenvalues(top_n=5, maxIter=1000, tol=τ)`` (power iteration with deflation; its default
     ``maxIter=100`` caps the accuracy: its row "PyHessian maxIter=100", τ = 1e-3). It computes the 5 eigenvalues
     of largest *magnitude*, so its error is measured against those (on ``cnn1d`` two of them are negative, and
     against the top 5 it is off by ~200%; both errors are reported). Chosen: the loosest τ reaching 1e-4 or, if
     none does, the loosest within 2× of the best error it reaches ("its accuracy");
   - ours, ``top_eigenvalues(op, k=5, tol=τ, block_size=b)`` for ``b = 1`` and the default ``b = 2``, residual
     criterion, at the loosest τ reaching 1e-4 and at the loosest reaching the verdict's goal ``min(1e-4,
     PyHessian's error / 10)``. ``b = 1`` cannot certify ranks (only its first pair can be ``converged``, see
     ``top_eigenvalues``); the verdict uses ``b = 2`` when it reaches the goal with every pair converged, else
     ``b = 1`` when it reaches the goal, and says which;
   - curvlinops ``HessianLinearOperator(...).to_scipy()`` and scipy's ``eigsh(k=5, which="LA", tol=τ)`` (ARPACK;
     products counted by a wrapping scipy ``LinearOperator``), if curvlinops is installed;
   - hessian-eigenthings ``lanczos(HessianOperator(...), k=5, max_iter=m, which="LA")`` (a fixed number of steps
     ``m``, the ladder; products counted by a wrapping ``LambdaOperator``), if installed.

   Target: ours ≤ 1/3 of PyHessian's HVPs at ≥ 10× its accuracy (our worst error ≤ its worst error / 10).
3. **Batched vs single products**: ``op.matmat(V)`` for a ``(dim, k)`` block, k = 1, 8, 16, against k separate
   ``op.matvec`` calls, per vector, median of interleaved rounds, for the default operator (double backward,
   cached graph) and forward-over-reverse. Target: default operator, k = 8 and 16, ≥ 1.5× faster per vector on
   the MLP. Hutch++ (99 products) through the block path and through a wrapper that hides ``matmat`` (column by
   column): the same random vectors, the same value up to rounding; both timed.
4. **Trace and density**: PyHessian's Hutchinson (stops when the running mean changes by < 1e-3) against ours with
   the same number of probes (which also reports a standard error) and Hutch++ (99 products); PyHessian's
   ``density(iter=100, n_v=1)`` against our ``spectral_density(num_probes=1, num_matvecs_per_probe=100)`` (SLQ), with
   the extreme quadrature nodes against the reference λ_max and λ_min as a check. PyHessian's ``density`` calls
   ``torch.eig``, removed from torch; a shim with ``torch.linalg.eigh`` (its matrix is symmetric tridiagonal)
   stands in while it runs. Cost of one HVP per backend: double backward with and without the cached graph,
   forward-over-reverse.

curvlinops-for-pytorch is not in the ``bench`` extra: it depends on backpack-for-pytorch, which pulls torchvision,
and the torchvision wheel that resolves next to the pinned torch 2.13.0+cpu fails to load ("operator
torchvision::nms does not exist"), which breaks ``import lightning`` (torchmetrics imports torchvision). Install it
without its dependencies: ``pip install -c constraints.txt --no-deps curvlinops-for-pytorch einconv einops
linear_operator opt_einsum`` (the Hessian operator does not use backpack). hessian-eigenthings (1.0.0a5 on PyPI) is
in the extra. A missing contender is skipped and said so.

    python benchmarks/bench_hessian.py [--repeats 5] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib
import importlib.metadata
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sharpness.curvature import (
    HessianOperator,
    hutchinson_trace,
    hutchpp_trace,
    power_iteration,
    spectral_density,
    top_eigenvalues,
)
from sharpness.data import load_dataset
from sharpness.models import build_model

pyh = importlib.import_module("pyhessian.hessian")  # the module: the package re-exports the class under its name


def _optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


curvlinops = _optional("curvlinops")
eigenthings = _optional("hessian_eigenthings")
scipy_linalg = _optional("scipy.sparse.linalg")

RESULTS = Path(__file__).resolve().parent / "results" / "hessian.json"
BATCH = 512
CLOCK: Callable[[], float] = time.process_time  # main() switches to perf_counter with more than one thread

# PyHessian builds its graph with loss.backward(create_graph=True), which warns about a reference cycle.
warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")


def workloads() -> dict[str, tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]]:
    data = load_dataset("mnist1d")
    batch = (data.x_train[:BATCH], data.y_train[:BATCH])
    torch.manual_seed(0)
    cnn = build_model("cnn1d", input_shape=data.input_shape, num_classes=10).eval()
    mlp = build_model("mlp", input_shape=data.input_shape, num_classes=10).eval()
    return {"cnn1d": (cnn, batch), "mlp": (mlp, batch)}


def timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    start = CLOCK()
    out = fn()
    out["seconds"] = CLOCK() - start
    return out


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


# ---------------------------------------------------------------------------------------------- references


WHICH = ("largest", "smallest")


def reference_spectrum(model: torch.nn.Module, batch) -> dict[str, Any]:
    """The 5 largest and 5 smallest eigenvalues in float64 (block 5, tol 1e-10), and the 5 largest in magnitude."""
    model64 = copy.deepcopy(model).double()
    op = HessianOperator(model64, F.cross_entropy, (batch[0].double(), batch[1]))
    ends = {which: top_eigenvalues(op, k=5, which=which, tol=1e-10, num_matvecs=600, block_size=5) for which in WHICH}
    for which, result in ends.items():
        if not bool(result.converged.all()):
            warnings.warn(f"reference: the {which} 5 eigenvalues did not all converge", stacklevel=2)
    largest, smallest = ends["largest"].eigenvalues.tolist(), ends["smallest"].eigenvalues.tolist()
    return {
        "largest": largest,
        "smallest": smallest,
        "largest_magnitude": sorted(largest + smallest, key=abs, reverse=True)[:5],
        "hvps": op.num_matvecs,
    }


def relative_error(values: list[float], reference: list[float], *, magnitude: bool = False) -> float:
    """The worst relative error of ``values`` against ``reference``, both sorted (by magnitude if asked)."""
    key = abs if magnitude else float
    ours, ref = sorted(values, key=key, reverse=True), sorted(reference, key=key, reverse=True)
    return max(abs(a - b) / abs(b) for a, b in zip(ours, ref, strict=True))


# ---------------------------------------------------------------------------------------------- λ_max (section 1)

ACCURACY = 1e-3
LADDERS = {
    "lanczos": [1e-1, 3e-2, 1e-2, 3e-3, 1e-3],
    "lanczos_eig": [1e-3, 3e-4, 1e-4, 3e-5],
    "power": [1e-3, 1e-4, 1e-5, 1e-6],
    "pyhessian": [1e-3, 1e-4, 1e-5, 1e-6],
}


def ours_lanczos(model, batch, seed: int, tol: float) -> dict[str, Any]:
    op = HessianOperator(model, F.cross_entropy, batch)
    result = top_eigenvalues(op, k=1, tol=tol, generator=torch.Generator().manual_seed(seed))
    return {"value": float(result.eigenvalues[0]), "hvps": result.num_matvecs}


def ours_lanczos_eig(model, batch, seed: int, tol: float) -> dict[str, Any]:
    """Lanczos stopping on the estimated eigenvalue error (criterion="eigenvalue"): tol is the accuracy asked."""
    op = HessianOperator(model, F.cross_entropy, batch)
    result = top_eigenvalues(op, k=1, tol=tol, criterion="eigenvalue", generator=torch.Generator().manual_seed(seed))
    return {"value": float(result.eigenvalues[0]), "hvps": result.num_matvecs}


def ours_power(model, batch, seed: int, tol: float) -> dict[str, Any]:
    op = HessianOperator(model, F.cross_entropy, batch)
    result = power_iteration(op, tol=tol, generator=torch.Generator().manual_seed(seed))
    return {"value": float(result.eigenvalue), "hvps": result.num_matvecs}


class _CountingHVP:
    """Wraps PyHessian's hessian_vector_product to count its calls."""

    def __init__(self) -> None:
        self.original, self.calls = pyh.hessian_vector_product, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.original(*args, **kwargs)

    def __enter__(self) -> _CountingHVP:
        pyh.hessian_vector_product = self
        return self

    def __exit__(self, *exc: Any) -> None:
        pyh.hessian_vector_product = self.original


def pyhessian_eig(model, batch, seed: int, tol: float) -> dict[str, Any]:
    torch.manual_seed(seed)  # PyHessian draws its start vector from the global generator
    with _CountingHVP() as counter:
        eigenvalues, _ = pyh.hessian(model, F.cross_entropy, data=batch, cuda=False).eigenvalues(maxIter=100, tol=tol)
    model.zero_grad(set_to_none=True)  # PyHessian leaves create_graph gradients in .grad
    return {"value": float(eigenvalues[0]), "hvps": counter.calls}


def pyhessian_trace(model, batch, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    with _CountingHVP() as counter:
        samples = pyh.hessian(model, F.cross_entropy, data=batch, cuda=False).trace(maxIter=100, tol=1e-3)
    model.zero_grad(set_to_none=True)
    return {"value": float(statistics.mean(samples)), "hvps": counter.calls, "samples": len(samples)}


def ours_trace(model, batch, seed: int, samples: int) -> dict[str, Any]:
    op = HessianOperator(model, F.cross_entropy, batch)
    estimate = hutchinson_trace(op, num_matvecs=samples, generator=torch.Generator().manual_seed(seed))
    return {"value": estimate.value, "stderr": estimate.stderr, "hvps": estimate.num_matvecs}


EIG_METHODS = {
    "lanczos": ours_lanczos,
    "lanczos_eig": ours_lanczos_eig,
    "power": ours_power,
    "pyhessian": pyhessian_eig,
}


def select_tolerances(model, batch, reference: float, seeds: int) -> dict[str, dict[str, Any]]:
    """Per method, the loosest tolerance of its ladder reaching ACCURACY on every seed (or the tightest tried)."""
    chosen = {}
    for method, ladder in LADDERS.items():
        tried = []
        for tol in ladder:
            error = max(
                abs(EIG_METHODS[method](model, batch, seed, tol)["value"] - reference) / abs(reference)
                for seed in range(seeds)
            )
            tried.append({"tol": tol, "max_rel_error": error})
            if error <= ACCURACY:
                break
        chosen[method] = {"tol": tried[-1]["tol"], "reached": tried[-1]["max_rel_error"] <= ACCURACY, "ladder": tried}
    return chosen


def lambda_max_section(model, batch, reference: float, repeats: int) -> dict[str, Any]:
    """λ_max at 1e-3 (tolerances chosen on the timed seeds, then interleaved timings) and the Hutchinson trace."""
    chosen = select_tolerances(model, batch, reference, repeats)
    raw: dict[str, list[dict[str, Any]]] = {key: [] for key in EIG_METHODS}
    trace_raw: dict[str, list[dict[str, Any]]] = {"pyhessian": [], "ours": []}
    for repeat in range(repeats):
        shift = repeat % len(EIG_METHODS)
        order = list(EIG_METHODS)[shift:] + list(EIG_METHODS)[:shift]
        for key in order:
            tol = chosen[key]["tol"]
            raw[key].append(timed(lambda key=key, tol=tol: EIG_METHODS[key](model, batch, repeat, tol)))
        pyh_trace = timed(lambda: pyhessian_trace(model, batch, repeat))
        trace_raw["pyhessian"].append(pyh_trace)
        trace_raw["ours"].append(timed(lambda: ours_trace(model, batch, repeat, pyh_trace["samples"])))
    summary = {
        key: {
            "tol": chosen[key]["tol"],
            "tol_reached_accuracy": chosen[key]["reached"],
            "hvps": median_of(runs, "hvps"),
            "seconds": median_of(runs, "seconds"),
            "max_rel_error": max(abs(r["value"] - reference) / abs(reference) for r in runs),
        }
        for key, runs in raw.items()
    }
    best = min(("lanczos", "lanczos_eig"), key=lambda key: summary[key]["seconds"])
    ratios = {
        "method": best,
        "hvps": summary[best]["hvps"] / summary["pyhessian"]["hvps"],
        "seconds": summary[best]["seconds"] / summary["pyhessian"]["seconds"],
    }
    trace = {
        key: {"value": median_of(runs, "value"), "hvps": median_of(runs, "hvps"), "seconds": median_of(runs, "seconds")}
        for key, runs in trace_raw.items()
    }
    trace["ours"]["stderr"] = median_of(trace_raw["ours"], "stderr")
    return {
        "eig": summary,
        "tolerance_selection": chosen,
        "lanczos_over_pyhessian": ratios,
        "pass": ratios["hvps"] <= 1 / 3 and ratios["seconds"] <= 0.5 and summary[best]["max_rel_error"] <= ACCURACY,
        "trace": trace,
        "raw": {"eig": raw, "trace": trace_raw},
    }


# ---------------------------------------------------------------------------------------------- top 5 (section 2)

TOP5_ACCURACY = 1e-4
TOP5_PYH_MAXITER = 1000  # per eigenvalue; PyHessian's default 100 caps the accuracy (the "defaults" row)
TOP5_LADDERS: dict[str, list[float]] = {
    "pyhessian": [1e-3, 1e-4, 1e-5, 1e-6, 1e-7],
    "ours": [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5],
    "curvlinops": [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6],
    "eigenthings": [10, 15, 20, 25, 30, 35, 40, 45, 50, 60, 70, 80, 100],  # Lanczos steps
}


def ours_top5(block_size: int) -> Callable[..., dict[str, Any]]:
    def run(model, batch, seed: int, tol: float) -> dict[str, Any]:
        op = HessianOperator(model, F.cross_entropy, batch)
        generator = torch.Generator().manual_seed(seed)
        result = top_eigenvalues(op, k=5, tol=tol, num_matvecs=300, block_size=block_size, generator=generator)
        converged = bool(result.converged.all())
        return {"values": result.eigenvalues.tolist(), "hvps": result.num_matvecs, "converged": converged}

    return run


def pyhessian_top5(model, batch, seed: int, tol: float, max_iter: int = TOP5_PYH_MAXITER) -> dict[str, Any]:
    torch.manual_seed(seed)
    with _CountingHVP() as counter:
        hessian = pyh.hessian(model, F.cross_entropy, data=batch, cuda=False)
        values, _ = hessian.eigenvalues(maxIter=max_iter, tol=tol, top_n=5)
    model.zero_grad(set_to_none=True)
    return {"values": [float(v) for v in values], "hvps": counter.calls}


def pyhessian_top5_defaults(model, batch, seed: int, tol: float) -> dict[str, Any]:
    return pyhessian_top5(model, batch, seed, tol, max_iter=100)


def curvlinops_top5(model, batch, seed: int, tol: float) -> dict[str, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    loss = torch.nn.CrossEntropyLoss()
    hessian = curvlinops.HessianLinearOperator(model, loss, params, [batch], check_deterministic=False).to_scipy()
    calls = 0

    def product(x: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1 if x.ndim == 1 else x.shape[1]
        return hessian @ x

    op = scipy_linalg.LinearOperator(hessian.shape, matvec=product, matmat=product, dtype=hessian.dtype)
    start = np.random.default_rng(seed).standard_normal(hessian.shape[0])
    values = scipy_linalg.eigsh(op, k=5, which="LA", tol=tol, v0=start, return_eigenvectors=False)
    return {"values": sorted(values.tolist(), reverse=True), "hvps": calls}


def eigenthings_top5(model, batch, seed: int, steps: int) -> dict[str, Any]:
    op = eigenthings.HessianOperator(model, [batch], eigenthings.supervised_loss(F.cross_entropy))
    calls = 0

    def product(v: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return op.matvec(v)

    counted = eigenthings.LambdaOperator(product, op.size, op.device, op.dtype)
    result = eigenthings.lanczos(counted, k=5, max_iter=steps, which="LA", seed=seed, reorthogonalize=True)
    return {"values": result.eigenvalues.tolist(), "hvps": calls}


def climb(run, model, batch, ladder, seeds: int, error: Callable[[list[float]], float], goal: float) -> list[dict]:
    """Run every seed at each setting of ``ladder`` (loosest first) until the worst error is ≤ ``goal``."""
    tried = []
    for setting in ladder:
        runs = [timed(lambda seed=seed: run(model, batch, seed, setting)) for seed in range(seeds)]
        for seed, r in enumerate(runs):
            r["seed"], r["rel_error"] = seed, error(r["values"])
        step = {
            "setting": setting,
            "max_rel_error": max(r["rel_error"] for r in runs),
            "hvps": median_of(runs, "hvps"),
            "seconds": median_of(runs, "seconds"),
            "runs": runs,
        }
        if "converged" in runs[0]:
            step["converged"] = all(r["converged"] for r in runs)
        tried.append(step)
        if step["max_rel_error"] <= goal:
            break
    return tried


def pick(tried: list[dict], goal: float) -> dict[str, Any]:
    """The first (loosest) step reaching ``goal``; else the loosest within 2× of the best error (not reached)."""
    reached = [s for s in tried if s["max_rel_error"] <= goal]
    if reached:
        step = reached[0]
    else:
        best = min(s["max_rel_error"] for s in tried)
        step = next(s for s in tried if s["max_rel_error"] <= 2 * best)
    summary = {key: value for key, value in step.items() if key != "runs"}
    return {**summary, "goal": goal, "reached": bool(reached)}


def top5_section(model, batch, reference: dict[str, Any], seeds: int) -> dict[str, Any]:
    """Top-5 eigenvalues: every contender's ladder, chosen settings, and the verdict against PyHessian."""

    def algebraic(values: list[float]) -> float:  # against the 5 largest eigenvalues
        return relative_error(values, reference["largest"])

    def magnitude(values: list[float]) -> float:  # against the 5 largest in magnitude (what PyHessian computes)
        return relative_error(values, reference["largest_magnitude"], magnitude=True)

    ladders: dict[str, list[dict]] = {}
    rows: dict[str, dict[str, Any]] = {}

    defaults = climb(pyhessian_top5_defaults, model, batch, [1e-3], seeds, magnitude, goal=0.0)
    rows["pyhessian_defaults"] = pick(defaults, TOP5_ACCURACY)
    rows["pyhessian_defaults"]["max_rel_error_top5"] = max(algebraic(r["values"]) for r in defaults[0]["runs"])
    ladders["pyhessian"] = climb(
        pyhessian_top5, model, batch, TOP5_LADDERS["pyhessian"], seeds, magnitude, TOP5_ACCURACY
    )
    rows["pyhessian"] = pick(ladders["pyhessian"], TOP5_ACCURACY)
    chosen_runs = next(s for s in ladders["pyhessian"] if s["setting"] == rows["pyhessian"]["setting"])["runs"]
    rows["pyhessian"]["max_rel_error_top5"] = max(algebraic(r["values"]) for r in chosen_runs)
    goal = min(TOP5_ACCURACY, rows["pyhessian"]["max_rel_error"] / 10)

    for block in (1, 2):
        key = f"ours_b{block}"
        ladders[key] = climb(ours_top5(block), model, batch, TOP5_LADDERS["ours"], seeds, algebraic, goal)
        rows[key] = pick(ladders[key], TOP5_ACCURACY)
        rows[f"{key}_goal"] = pick(ladders[key], goal)
    others = {"curvlinops": (curvlinops, curvlinops_top5), "eigenthings": (eigenthings, eigenthings_top5)}
    for key, (module, run) in others.items():
        if module is None or (key == "curvlinops" and scipy_linalg is None):
            rows[key] = {"skipped": "not installed"}
            continue
        ladders[key] = climb(run, model, batch, TOP5_LADDERS[key], seeds, algebraic, TOP5_ACCURACY)
        rows[key] = pick(ladders[key], TOP5_ACCURACY)
    return {"goal": goal, "rows": rows, "verdict": top5_verdict(rows), "ladders": ladders}


def top5_verdict(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ours (block 2 if it reaches the goal with every rank certified, else block 1) against PyHessian."""
    b2, b1, pyh_row = rows["ours_b2_goal"], rows["ours_b1_goal"], rows["pyhessian"]
    used = "ours_b2" if b2["reached"] and b2.get("converged", False) else "ours_b1" if b1["reached"] else None
    if used is None:
        return {"used": None, "pass": False, "why": "neither block size reached the goal"}
    ours = rows[f"{used}_goal"]
    hvps = ours["hvps"] / pyh_row["hvps"]
    accuracy = pyh_row["max_rel_error"] / max(ours["max_rel_error"], 1e-300)
    return {
        "used": used,
        "hvps_ratio": hvps,
        "seconds_ratio": ours["seconds"] / pyh_row["seconds"],
        "accuracy_ratio": accuracy,
        "pyhessian_reached_1e-4": pyh_row["reached"],
        "pass": hvps <= 1 / 3 and accuracy >= 10,
    }


# ---------------------------------------------------------------------------------------------- products (section 3)

BLOCK_SIZES = (1, 8, 16)
BATCHED_TARGET = 1.5
HUTCHPP_BUDGET = 99


class _ColumnsOnly:
    """An operator without ``matmat``: the estimators then multiply a block column by column (``matvec``)."""

    def __init__(self, op: HessianOperator) -> None:
        self.op, self.dim, self.dtype, self.device = op, op.dim, op.dtype, op.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.op.matvec(v)


def interleaved(contenders: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds of every contender per round, the order rotated each round."""
    times: dict[str, list[float]] = {key: [] for key in contenders}
    keys = list(contenders)
    for r in range(rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            start = CLOCK()
            contenders[key]()
            times[key].append(CLOCK() - start)
    return times


def block_products(model, batch, rounds: int) -> dict[str, dict[str, Any]]:
    """Per backend and block size k: median seconds per vector of ``matmat(V)`` and of k ``matvec`` calls."""
    out = {}
    for backend in ("double_backward", "forward_over_reverse"):
        op = HessianOperator(model, F.cross_entropy, batch, backend=backend)
        generator = torch.Generator().manual_seed(0)
        for k in BLOCK_SIZES:
            block = torch.randn(op.dim, k, generator=generator)
            columns = [block[:, i].contiguous() for i in range(k)]
            difference = float((op.matmat(block) - torch.stack([op.matvec(c) for c in columns], 1)).abs().max())
            times = interleaved(
                {"matmat": lambda: op.matmat(block), "matvec": lambda: [op.matvec(c) for c in columns]}, rounds
            )
            per_vector = {key: statistics.median(t) / k for key, t in times.items()}
            out[f"{backend}/k={k}"] = {
                "backend": backend,
                "k": k,
                "matmat_seconds_per_vector": per_vector["matmat"],
                "matvec_seconds_per_vector": per_vector["matvec"],
                "speedup": per_vector["matvec"] / per_vector["matmat"],
                "max_abs_difference": difference,
                "raw": times,
            }
    return out


def batched_verdict(products: dict[str, dict[str, Any]]) -> dict[str, Any]:
    speedups = {
        key: row["speedup"] for key, row in products.items() if key.startswith("double_backward/") and row["k"] > 1
    }
    best_single = min(row["matvec_seconds_per_vector"] for row in products.values())
    best_block = min(row["matmat_seconds_per_vector"] for row in products.values() if row["k"] > 1)
    return {
        "speedups": speedups,
        "best_block_over_best_single": best_single / best_block,
        "pass": min(speedups.values()) >= BATCHED_TARGET,
    }


def ours_hutchpp(model, batch, seed: int, columns: bool) -> dict[str, Any]:
    op = HessianOperator(model, F.cross_entropy, batch)
    generator = torch.Generator().manual_seed(seed)
    estimate = hutchpp_trace(_ColumnsOnly(op) if columns else op, num_matvecs=HUTCHPP_BUDGET, generator=generator)
    return {"value": estimate.value, "stderr": estimate.stderr, "hvps": estimate.num_matvecs}


def hutchpp_paths(model, batch, repeats: int) -> dict[str, Any]:
    """Hutch++ through the block path and column by column: same seeds, interleaved, medians."""
    raw: dict[str, list[dict[str, Any]]] = {"block": [], "columns": []}
    for seed in range(repeats):
        order = ["block", "columns"] if seed % 2 == 0 else ["columns", "block"]
        for path in order:
            raw[path].append(timed(lambda path=path: ours_hutchpp(model, batch, seed, path == "columns")))
    summary = {
        path: {key: median_of(runs, key) for key in ("value", "stderr", "hvps", "seconds")}
        for path, runs in raw.items()
    }
    difference = max(
        abs(a["value"] - b["value"]) / abs(b["value"]) for a, b in zip(raw["block"], raw["columns"], strict=True)
    )
    return {**summary, "max_rel_difference": difference, "raw": raw}


# ---------------------------------------------------------------------------------------------- density (section 4)

SLQ_STEPS, SLQ_VECTORS = 100, 1  # PyHessian's density() defaults


@contextlib.contextmanager
def _torch_eig_shim() -> Iterator[None]:
    """``torch.eig`` (removed from torch) for PyHessian's density(): its matrix is symmetric tridiagonal."""

    def eig(matrix: torch.Tensor, eigenvectors: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        values, vectors = torch.linalg.eigh(matrix)
        return torch.stack([values, torch.zeros_like(values)], dim=1), vectors

    missing = object()
    original = getattr(torch, "eig", missing)
    torch.eig = eig
    try:
        yield
    finally:
        if original is missing:
            del torch.eig
        else:
            torch.eig = original


def pyhessian_density(model, batch, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    with _CountingHVP() as counter, _torch_eig_shim():
        nodes, _ = pyh.hessian(model, F.cross_entropy, data=batch, cuda=False).density(iter=SLQ_STEPS, n_v=SLQ_VECTORS)
    model.zero_grad(set_to_none=True)
    flat = [float(x) for run in nodes for x in run]
    return {"hvps": counter.calls, "top_node": max(flat), "bottom_node": min(flat)}


def ours_density(model, batch, seed: int) -> dict[str, Any]:
    op = HessianOperator(model, F.cross_entropy, batch)
    generator = torch.Generator().manual_seed(seed)
    density = spectral_density(op, num_probes=SLQ_VECTORS, num_matvecs_per_probe=SLQ_STEPS, generator=generator)
    nodes = density.nodes
    return {"hvps": density.num_matvecs, "top_node": float(nodes.max()), "bottom_node": float(nodes.min())}


def density_section(model, batch, reference: dict[str, Any], repeats: int) -> dict[str, Any]:
    """SLQ: PyHessian against ours, interleaved over the seeds; the extreme nodes against λ_max and λ_min."""
    contenders = {"pyhessian": pyhessian_density, "ours": ours_density}
    raw: dict[str, list[dict[str, Any]]] = {key: [] for key in contenders}
    for seed in range(repeats):
        for key in list(contenders)[seed % 2 :] + list(contenders)[: seed % 2]:
            raw[key].append(timed(lambda key=key: contenders[key](model, batch, seed)))
    top, bottom = reference["largest"][0], reference["smallest"][0]
    summary = {
        key: {
            "hvps": median_of(runs, "hvps"),
            "seconds": median_of(runs, "seconds"),
            "top_node_max_rel_error": max(abs(r["top_node"] - top) / abs(top) for r in runs),
            "bottom_node_max_rel_error": max(abs(r["bottom_node"] - bottom) / abs(bottom) for r in runs),
        }
        for key, runs in raw.items()
    }
    return {**summary, "raw": raw}


def hvp_seconds(model, batch, repeats: int = 20) -> dict[str, float]:
    """Median seconds per product for each backend (after a first product that builds any cache)."""
    out = {}
    for label, kwargs in {
        "double_backward_cached": dict(backend="double_backward", cache_graph=True),
        "double_backward_uncached": dict(backend="double_backward", cache_graph=False),
        "forward_over_reverse": dict(backend="forward_over_reverse"),
    }.items():
        op = HessianOperator(model, F.cross_entropy, batch, **kwargs)
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0))
        op.matvec(v)
        out[label] = statistics.median(interleaved({"matvec": lambda: op.matvec(v)}, repeats)["matvec"])
    return out


# ---------------------------------------------------------------------------------------------- printing


def print_lambda_max(results: dict[str, Any]) -> None:
    print(f"\n== λ_max at relative accuracy {ACCURACY:g}")
    print(f"{'model':<7}{'method':<12}{'tol':>7}{'HVPs':>6}{'seconds':>9}{'max rel err':>13}")
    for name, res in results.items():
        sec = res["lambda_max"]
        for key, row in sec["eig"].items():
            print(
                f"{name:<7}{key:<12}{row['tol']:>7.0e}{row['hvps']:>6.0f}{row['seconds']:>9.3f}"
                f"{row['max_rel_error']:>13.2e}{'' if row['tol_reached_accuracy'] else '  (never reached 1e-3)'}"
            )
        r = sec["lanczos_over_pyhessian"]
        print(
            f"  λ_max ref {res['reference']['largest'][0]:.6g}; {r['method']}/PyHessian: HVPs {r['hvps']:.3f} "
            f"(target ≤ 0.333), time {r['seconds']:.3f} (≤ 0.5): {'PASS' if sec['pass'] else 'FAIL'}"
        )


TOP5_LABELS = {
    "pyhessian_defaults": "PyHessian maxIter=100",
    "pyhessian": "PyHessian maxIter=1000",
    "ours_b1": "ours b=1",
    "ours_b2": "ours b=2",
    "ours_b1_goal": "ours b=1 @goal",
    "ours_b2_goal": "ours b=2 @goal",
    "curvlinops": "curvlinops+eigsh",
    "eigenthings": "eigenthings",
}


def print_top5(results: dict[str, Any]) -> None:
    print(f"\n== Top-5 eigenvalues at relative accuracy {TOP5_ACCURACY:g} (worst of 5 over the seeds)")
    print(f"{'model':<7}{'method':<24}{'setting':>8}{'HVPs':>7}{'seconds':>9}{'max rel err':>13}  notes")
    for name, res in results.items():
        sec = res["top5"]
        for key, row in sec["rows"].items():
            if "skipped" in row:
                print(f"{name:<7}{TOP5_LABELS[key]:<24}  skipped: {row['skipped']}")
                continue
            notes = [] if row["reached"] else [f"goal {row['goal']:.0e} not reached: its best"]
            if key.startswith("ours") and key.endswith("_goal"):
                notes.append(f"goal {row['goal']:.1e}")
            if "converged" in row:
                notes.append("all ranks certified" if row["converged"] else "ranks not certified")
            if "max_rel_error_top5" in row:
                notes.append(f"error vs the 5 largest |λ|; vs the top 5: {row['max_rel_error_top5']:.1e}")
            setting = f"{row['setting']:.0e}" if isinstance(row["setting"], float) else str(row["setting"])
            print(
                f"{name:<7}{TOP5_LABELS[key]:<24}{setting:>8}{row['hvps']:>7.0f}{row['seconds']:>9.3f}"
                f"{row['max_rel_error']:>13.2e}  {'; '.join(notes)}"
            )
        v = sec["verdict"]
        if v["used"] is None:
            print(f"  top-5 verdict: FAIL ({v['why']})")
            continue
        reached = "" if v["pyhessian_reached_1e-4"] else " (PyHessian never reached 1e-4: compared at its best)"
        print(
            f"  top-5 verdict ({TOP5_LABELS[v['used']]}): HVPs {v['hvps_ratio']:.3f} of PyHessian's (target ≤ 0.333), "
            f"accuracy {v['accuracy_ratio']:.1f}× its (≥ 10), time {v['seconds_ratio']:.3f}: "
            f"{'PASS' if v['pass'] else 'FAIL'}{reached}"
        )


def print_products(results: dict[str, Any]) -> None:
    print("\n== Batched vs single products (ms per vector, median of interleaved rounds)")
    print(f"{'model':<7}{'backend':<22}{'k':>4}{'matmat':>9}{'matvec':>9}{'speed-up':>10}{'max |diff|':>12}")
    for name, res in results.items():
        for row in res["products"].values():
            print(
                f"{name:<7}{row['backend']:<22}{row['k']:>4}{1e3 * row['matmat_seconds_per_vector']:>9.2f}"
                f"{1e3 * row['matvec_seconds_per_vector']:>9.2f}{row['speedup']:>10.2f}"
                f"{row['max_abs_difference']:>12.1e}"
            )
        v = res["products_verdict"]
        speedups = ", ".join(f"{key.split('/')[1]}: {value:.2f}" for key, value in v["speedups"].items())
        target = f"target ≥ {BATCHED_TARGET} ({'PASS' if v['pass'] else 'FAIL'})" if name == "mlp" else "no target"
        print(
            f"  default operator speed-up {speedups}; {target}; best batched over best single product "
            f"{v['best_block_over_best_single']:.2f}"
        )
        h = res["hutchpp"]
        print(
            f"  Hutch++ ({HUTCHPP_BUDGET} products): block path {h['block']['value']:.5g} in "
            f"{h['block']['seconds']:.3f} s, column path {h['columns']['value']:.5g} in "
            f"{h['columns']['seconds']:.3f} s, max rel difference {h['max_rel_difference']:.1e}"
        )


def print_trace_density(results: dict[str, Any]) -> None:
    print("\n== Trace and spectral density")
    print(f"{'model':<7}{'estimate':<36}{'value':>10}{'± stderr':>10}{'HVPs':>6}{'seconds':>9}")
    for name, res in results.items():
        t, h = res["lambda_max"]["trace"], res["hutchpp"]["block"]
        rows = [
            ("PyHessian Hutchinson (its rule)", t["pyhessian"]["value"], None, t["pyhessian"]),
            ("ours Hutchinson (same probes)", t["ours"]["value"], t["ours"]["stderr"], t["ours"]),
            (f"ours Hutch++ ({HUTCHPP_BUDGET})", h["value"], h["stderr"], h),
        ]
        for label, value, stderr, row in rows:
            err = f"{stderr:>10.3g}" if stderr is not None else f"{'':>10}"
            print(f"{name:<7}{label:<36}{value:>10.4g}{err}{row['hvps']:>6.0f}{row['seconds']:>9.3f}")
        for key, label in (("pyhessian", "PyHessian density"), ("ours", "ours spectral_density")):
            d = res["density"][key]
            print(
                f"{name:<7}{f'{label} ({SLQ_VECTORS}×{SLQ_STEPS})':<36}{'':>20}{d['hvps']:>6.0f}{d['seconds']:>9.3f}"
                f"  top node err {d['top_node_max_rel_error']:.1e}, bottom {d['bottom_node_max_rel_error']:.1e}"
            )
        c = res["hvp_seconds"]
        print(
            f"  ms per HVP: double backward cached {1e3 * c['double_backward_cached']:.2f}, uncached "
            f"{1e3 * c['double_backward_uncached']:.2f}, forward-over-reverse {1e3 * c['forward_over_reverse']:.2f}"
        )


# ---------------------------------------------------------------------------------------------- main


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__, "python": platform.python_version()}
    for package in ("pyhessian", "curvlinops-for-pytorch", "hessian-eigenthings", "scipy"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    out["platform"] = platform.platform()
    return out


def measure(model, batch, repeats: int) -> dict[str, Any]:
    reference = reference_spectrum(model, batch)
    products = block_products(model, batch, rounds=max(5, 2 * repeats))
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "reference": reference,
        "lambda_max": lambda_max_section(model, batch, reference["largest"][0], repeats),
        "top5": top5_section(model, batch, reference, repeats),
        "products": products,
        "products_verdict": batched_verdict(products),
        "hutchpp": hutchpp_paths(model, batch, repeats),
        "density": density_section(model, batch, reference, repeats),
        "hvp_seconds": hvp_seconds(model, batch),
    }


def passed(name: str, res: dict[str, Any]) -> bool:
    ok = res["lambda_max"]["pass"] and res["top5"]["verdict"]["pass"]
    return ok and (res["products_verdict"]["pass"] if name == "mlp" else True)


def main() -> int:
    global CLOCK
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="seeds per contender and setting (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch default)")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    CLOCK = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    started = time.perf_counter()
    results = {name: measure(model, batch, args.repeats) for name, (model, batch) in workloads().items()}
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.repeats} repeats, batch {BATCH}, "
        f"{'CPU' if CLOCK is time.process_time else 'wall'} seconds"
    )
    for name, res in results.items():
        ref = res["reference"]
        print(
            f"{name}: {res['params']} parameters; reference top 5 {', '.join(f'{v:.6g}' for v in ref['largest'])}; "
            f"bottom {ref['smallest'][0]:.6g}"
        )
    print_lambda_max(results)
    print_top5(results)
    print_products(results)
    print_trace_density(results)
    verdicts = {name: passed(name, res) for name, res in results.items()}
    print(f"\noverall: {'PASS' if all(verdicts.values()) else 'FAIL'} ({time.perf_counter() - started:.0f} s)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "hessian",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "batch": BATCH,
            "clock": "process_time" if CLOCK is time.process_time else "perf_counter",
            "top5_pyhessian_max_iter": TOP5_PYH_MAXITER,
            "top5_ladders": TOP5_LADDERS,
            "slq": {"steps": SLQ_STEPS, "vectors": SLQ_VECTORS},
            "hutchpp_budget": HUTCHPP_BUDGET,
        },
        "machine": versions(),
        "pass": verdicts,
        "results": results,
    }
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
