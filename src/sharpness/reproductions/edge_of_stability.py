"""Reproduction of Long & Bartlett, "Sharpness-aware minimization and the edge of stability" (arXiv 2309.12488).

Full-batch GD and normalised SAM, ``w <- w - η ∇L(w + ρ g/||g||)``, on a square-loss tanh MLP trained on MNIST-1D.
Every few steps we measure ``λ_max`` of the training-loss Hessian (Lanczos on Hessian-vector products, warm-started
from the previous top eigenvector), ``||g||`` and the |cosine| between ``g`` and the top eigenvector, and compare
``λ_max`` with GD's edge ``2/η`` (Cohen et al., arXiv 2103.00065) and with the SAM-edge
``(||g||/2ρ)(√(1 + 8ρ/(η||g||)) − 1)``, the ``λ`` at which ``ηλ(1 + ρλ/||g||) = 2``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sharpness.curvature import HessianOperator, gd_edge, sam_edge, top_eigenvalues
from sharpness.data import load_dataset
from sharpness.experiments.figures import pyplot, save_figure
from sharpness.models import build_model
from sharpness.reproductions.base import Check, Reproduction

plt = pyplot()

NAME = "edge-of-stability"
TITLE = "GD and normalised SAM at the edge of stability"
REFERENCE = "Long & Bartlett, arXiv 2309.12488 (JMLR 2024); Cohen et al., arXiv 2103.00065"
BAND = (0.9, 1.1)  # lambda_max / edge must settle in this band
SETTLED = 0.4  # "settled": the measurements taken in the last 40% of the steps


def square_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """``(1/n) Σ_i ½ ||f(x_i) − y_i||²`` with one-hot targets ``y_i`` (Cohen et al.'s square loss)."""
    return 0.5 * ((outputs - targets) ** 2).sum(dim=1).mean()


def _flat_norm(tensors) -> float:
    return math.sqrt(sum(float((t * t).sum()) for t in tensors))


def _train(
    x: Tensor,
    y: Tensor,
    *,
    hidden: int,
    eta: float,
    rho: float,
    steps: int,
    every: int,
    seed: int,
    tol: float,
    max_iter: int,
) -> dict[str, list]:
    """Full-batch GD (``rho = 0``) or normalised SAM from the seed's initialisation; the measurements every ``every``.

    A measurement at step ``k`` is taken at the iterate ``w_k`` before its update: ``λ_max`` of the Hessian of the
    training loss, ``||∇L(w_k)||``, the loss, ``|cos(∇L(w_k), v_1)|`` and the edge (``2/η`` for GD, the SAM-edge
    with the measured ``||g||`` for SAM).
    """
    torch.manual_seed(seed)
    model = build_model("mlp", input_shape=(x.shape[1],), num_classes=y.shape[1], hidden=(hidden, hidden),
                        activation="tanh").to(torch.float64)  # fmt: skip
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    trace: dict[str, list] = {k: [] for k in ("step", "lambda_max", "grad_norm", "loss", "abs_cos", "edge")}
    trace["lanczos_converged"] = []
    vector = None
    matvecs = 0

    def loss_and_grad() -> tuple[float, tuple[Tensor, ...]]:
        loss = square_loss(model(x), y)
        return float(loss.detach()), torch.autograd.grad(loss, params)

    for k in range(steps + 1):
        loss, grads = loss_and_grad()
        if not math.isfinite(loss):
            raise RuntimeError(f"training diverged at step {k} (eta={eta}, rho={rho})")
        g_norm = _flat_norm(grads)
        if k % every == 0:
            op = HessianOperator(model, square_loss, (x, y))
            eig = top_eigenvalues(op, k=1, tol=tol, max_iter=max_iter, init=vector, generator=generator)
            vector = eig.eigenvectors[0]
            matvecs += eig.num_matvecs
            g_flat = torch.cat([g.reshape(-1) for g in grads])
            trace["step"].append(k)
            trace["lambda_max"].append(float(eig.eigenvalues[0]))
            trace["grad_norm"].append(g_norm)
            trace["loss"].append(loss)
            trace["abs_cos"].append(abs(float(g_flat @ vector)) / g_norm if g_norm > 0 else 0.0)
            trace["edge"].append(sam_edge(eta, rho, g_norm) if rho > 0 else gd_edge(eta))
            trace["lanczos_converged"].append(bool(eig.converged.all()))
        if k == steps:
            break
        if rho > 0 and g_norm > 0:  # normalised SAM: the gradient at w + rho g/||g||, applied at w
            with torch.no_grad():
                eps = [rho * g / g_norm for g in grads]
                for p, e in zip(params, eps, strict=True):
                    p.add_(e)
            _, grads = loss_and_grad()
            with torch.no_grad():
                for p, e in zip(params, eps, strict=True):
                    p.sub_(e)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(eta * g)
    trace["matvecs"] = [matvecs]
    return trace


def _settled(trace: dict[str, list], steps: int) -> np.ndarray:
    """Mask of the measurements taken in the last ``SETTLED`` fraction of the steps."""
    return np.asarray(trace["step"]) >= (1.0 - SETTLED) * steps


def _summary(trace: dict[str, list], eta: float, steps: int) -> dict[str, float]:
    mask = _settled(trace, steps)
    lam = np.asarray(trace["lambda_max"])
    edge = np.asarray(trace["edge"])
    ratio = lam[mask] / edge[mask]
    gd_ratio = lam[mask] / gd_edge(eta)
    return {
        "median_ratio_to_edge": float(np.median(ratio)),
        "q10_ratio_to_edge": float(np.quantile(ratio, 0.1)),
        "q90_ratio_to_edge": float(np.quantile(ratio, 0.9)),
        "fraction_in_band": float(np.mean((ratio >= BAND[0]) & (ratio <= BAND[1]))),
        "median_ratio_to_2_over_eta": float(np.median(gd_ratio)),
        "max_ratio_to_2_over_eta_settled": float(np.max(gd_ratio)),
        "max_ratio_to_2_over_eta_all": float(np.max(lam) / gd_edge(eta)),
        "median_lambda_max": float(np.median(lam[mask])),
        "median_edge": float(np.median(edge[mask])),
        "median_gap_2_over_eta_minus_lambda": float(np.median(gd_edge(eta) - lam[mask])),
        "median_grad_norm": float(np.median(np.asarray(trace["grad_norm"])[mask])),
        "median_abs_cos": float(np.median(np.asarray(trace["abs_cos"])[mask])),
        "initial_lambda_max": float(lam[0]),
        "peak_lambda_max": float(np.max(lam)),
        "final_loss": float(trace["loss"][-1]),
        "settled_measurements": int(mask.sum()),
        "lanczos_all_converged": bool(all(trace["lanczos_converged"])),
        "matvecs": int(trace["matvecs"][0]),
    }


def _label(rho: float) -> str:
    return "GD" if rho == 0 else f"SAM ρ={rho:g}"


def _figure(path: Path, runs: dict[float, dict], eta: float, steps: int, title: str) -> Path:
    n = len(runs)
    cols = 3
    rows = math.ceil((n + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    axes = axes.ravel()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    start = (1.0 - SETTLED) * steps
    for i, (rho, trace) in enumerate(runs.items()):
        ax = axes[i]
        ax.plot(trace["step"], trace["lambda_max"], color="tab:blue", lw=1, label="λ_max (Lanczos)")
        ax.axhline(gd_edge(eta), color="k", ls="--", lw=1, label="2/η")
        if rho > 0:
            ax.plot(trace["step"], trace["edge"], color="tab:red", lw=1, alpha=0.8, label="SAM-edge(η, ρ, ||g||)")
        ax.axvspan(start, steps, color="grey", alpha=0.1, label="settled window")
        ax.set(xlabel="step", ylabel="sharpness", title=f"{_label(rho)}, η={eta:g}")
        ax.set_ylim(0, 1.3 * gd_edge(eta))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    ax = axes[n]
    for i, (rho, trace) in enumerate(runs.items()):
        cos = np.asarray(trace["abs_cos"])
        width = max(1, len(cos) // 25)
        smooth = np.convolve(cos, np.ones(width) / width, mode="same")
        ax.plot(trace["step"], smooth, color=colours[i % len(colours)], lw=1.2, label=_label(rho))
    ax.set(xlabel="step", ylabel="|cos(g, v_1)| (running mean)", title="alignment of g with the top eigenvector")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for ax in axes[n + 1 :]:
        ax.set_visible(False)
    fig.suptitle(title)
    return save_figure(fig, path)


def _rounded(values: list, digits: int = 5) -> list:
    return [float(f"{v:.{digits}g}") if isinstance(v, float) else v for v in values]


def run(out_dir: Path, quick: bool, seed: int) -> Reproduction:
    """Run the edge-of-stability reproduction; figures go to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- settings
    n_train = 500 if quick else 2000
    hidden = 64
    eta = 0.2  # 2/eta = 10, ~3x the initial lambda_max (~3.5): GD must sharpen progressively to reach it
    rhos = [0.02, 0.05] if quick else [0.01, 0.02, 0.05]
    steps = 1500 if quick else 4000
    every = 15 if quick else 20
    tol, max_iter = 1e-3, 80

    dataset = load_dataset("mnist1d", seed=seed)
    x = dataset.x_train[:n_train].to(torch.float64)
    y = torch.nn.functional.one_hot(dataset.y_train[:n_train], dataset.num_classes).to(torch.float64)
    runs: dict[float, dict] = {}
    for rho in [0.0, *rhos]:
        runs[rho] = _train(x, y, hidden=hidden, eta=eta, rho=rho, steps=steps, every=every, seed=seed, tol=tol,
                           max_iter=max_iter)  # fmt: skip
    summaries = {_label(rho): _summary(trace, eta, steps) for rho, trace in runs.items()}
    window = f"median over the {summaries['GD']['settled_measurements']} measurements in the last {SETTLED:.0%} " \
        f"of the {steps} steps (steps >= {(1 - SETTLED) * steps:.0f})"  # fmt: skip
    checks: list[Check] = []

    # ---------------------------------------------------------------- 1: GD at 2/eta
    gd = summaries["GD"]
    checks.append(
        Check(
            f"(1) full-batch GD (η={eta:g}) sharpens progressively and then trains at the edge of stability: "
            f"λ_max/(2/η) settles in [{BAND[0]}, {BAND[1]}] ({window})",
            gd["initial_lambda_max"] < 0.5 * gd_edge(eta) and BAND[0] <= gd["median_ratio_to_edge"] <= BAND[1],
            f"λ_max rises from {gd['initial_lambda_max']:.3f} to a peak of {gd['peak_lambda_max']:.3f}; settled "
            f"median λ_max/(2/η) = {gd['median_ratio_to_edge']:.4f} (10–90% quantiles "
            f"{gd['q10_ratio_to_edge']:.3f}–{gd['q90_ratio_to_edge']:.3f}, {gd['fraction_in_band']:.0%} of "
            f"measurements in the band), 2/η = {gd_edge(eta):g}",
        )
    )

    # ---------------------------------------------------------------- 2: SAM at the SAM-edge, below 2/eta
    sam_ok = all(
        BAND[0] <= summaries[_label(r)]["median_ratio_to_edge"] <= BAND[1]
        and summaries[_label(r)]["max_ratio_to_2_over_eta_settled"] < 1.0
        for r in rhos
    )
    detail = "; ".join(
        f"ρ={r:g}: median λ_max/SAM-edge = {s['median_ratio_to_edge']:.4f} (10–90% {s['q10_ratio_to_edge']:.3f}–"
        f"{s['q90_ratio_to_edge']:.3f}), median SAM-edge {s['median_edge']:.3f} at median ||g|| "
        f"{s['median_grad_norm']:.3f}, max λ_max/(2/η) settled {s['max_ratio_to_2_over_eta_settled']:.3f} "
        f"(whole run {s['max_ratio_to_2_over_eta_all']:.3f})"
        for r in rhos
        for s in [summaries[_label(r)]]
    )
    checks.append(
        Check(
            f"(2) normalised SAM (η={eta:g}, ρ ∈ {{{', '.join(f'{r:g}' for r in rhos)}}}) trains at the SAM-edge: "
            f"λ_max / SAM-edge(η, ρ, ||g||) settles in [{BAND[0]}, {BAND[1]}] ({window}, ||g|| measured at the "
            "same step), and λ_max stays below 2/η at every settled measurement",
            sam_ok,
            detail,
        )
    )

    # ---------------------------------------------------------------- 3: the gap grows with rho
    gaps = [summaries[_label(r)]["median_gap_2_over_eta_minus_lambda"] for r in [0.0, *rhos]]
    increasing = all(b > a for a, b in zip(gaps, gaps[1:], strict=False))
    checks.append(
        Check(
            "(3) the gap 2/η − λ_max grows with ρ (settled medians, GD as ρ = 0)",
            increasing,
            ", ".join(f"{_label(r)}: {g:.3f}" for r, g in zip([0.0, *rhos], gaps, strict=True))
            + f" (2/η = {gd_edge(eta):g})",
        )
    )

    figures = [
        _figure(out_dir / "edge_of_stability.png", runs, eta, steps,
                f"Square-loss tanh MLP ({hidden}-{hidden}) on {n_train} MNIST-1D examples, full batch, η={eta:g}")
    ]  # fmt: skip

    numbers = {
        "two_over_eta": gd_edge(eta),
        "summaries": summaries,
        "gaps": dict(zip([_label(r) for r in [0.0, *rhos]], gaps, strict=True)),
        "traces": {
            _label(rho): {
                key: _rounded(trace[key]) for key in ("step", "lambda_max", "grad_norm", "loss", "abs_cos", "edge")
            }
            for rho, trace in runs.items()
        },
    }
    settings = {
        "seed": seed,
        "quick": quick,
        "dataset": "mnist1d (first n_train training examples, sharpness.data defaults)",
        "n_train": n_train,
        "model": f"mlp 40-{hidden}-{hidden}-10, tanh, PyTorch default init (torch.manual_seed(seed)), float64",
        "loss": "square loss (1/n) Σ ½||f(x_i) − onehot(y_i)||²",
        "eta": eta,
        "rhos": rhos,
        "steps": steps,
        "measure_every": every,
        "settled_fraction": SETTLED,
        "band": list(BAND),
        "lanczos": {
            "k": 1,
            "tol": tol,
            "max_iter": max_iter,
            "warm_start": "previous top eigenvector",
            "first_start": "Gaussian from torch.Generator().manual_seed(seed)",
        },
    }
    assumptions = [
        "MNIST-1D stands in for the paper's MNIST / CIFAR-10 subsets, and a 2-hidden-layer tanh MLP of width "
        f"{hidden} for its networks; the square loss sums over the 10 outputs (Cohen et al.'s convention)",
        f"η = {eta:g} chosen so that 2/η = {gd_edge(eta):g} is about 3x the initial λ_max, so GD has to sharpen "
        "progressively before it reaches the edge; ρ values chosen so the SAM-edge is clearly below 2/η",
        "normalised SAM with full-batch gradients: w <- w − η ∇L(w + ρ g/||g||), g = ∇L(w)",
        "the SAM-edge at a measurement uses ||g|| = ||∇L(w_k)|| at that same iterate (not a smoothed value)",
        f"'settles' means: the median over the measurements in the last {SETTLED:.0%} of the steps; the band "
        f"[{BAND[0]}, {BAND[1]}] is this project's check (the paper reports ≈ [0.95, 1.1])",
        "'λ_max stays below 2/η' is tested at every measurement in the settled window (the whole-run maximum is "
        "reported too)",
        "the |cos| alignment of g with the top eigenvector is reported and plotted, not tested",
    ]
    return Reproduction(
        name=NAME,
        title=TITLE,
        reference=REFERENCE,
        checks=checks,
        figures=figures,
        numbers=numbers,
        settings=settings,
        assumptions=assumptions,
    )
