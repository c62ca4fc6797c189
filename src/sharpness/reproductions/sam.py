"""Reproduction of Foret, Kleiner, Mobahi & Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
Generalization" (ICLR 2021, arXiv 2010.01412) on MNIST-1D; papers.md §1.

(1) SGD vs SAM test accuracy, clean and under symmetric label noise (a fraction of the training labels replaced by
another class), mean ± 95% CI over seeds (the paper's Table 1 and its label-noise table).
(2) The Hessian spectrum at the end of training (Lanczos, top 5 eigenvalues of the training loss): λ_max and
λ_max/λ_5 lower with SAM (the paper's Figure 3, left).
(3) m-sharpness (§4.1): SAM trained with a perturbation per micro-batch of ``m`` examples
(:meth:`sharpness.SAM.step_micro_batches`) for several ``m``; smaller ``m`` generalises better, and the
worst-case ρ-sharpness measured on disjoint batches of ``m`` training examples,

    S_m(w) = (1/K) Σ_k max_{||δ||_2 ≤ ρ} [L_{B_k}(w + δ) − L_{B_k}(w)],      |B_k| = m,

ranks the trained models by their generalisation gap better at small ``m`` than at the size of the whole
measurement set (the paper's Figure 3, right). The rank agreement is Kendall's τ_b over the clean models.

The runs are independent, so they are trained in parallel worker processes (one thread each); every run is
deterministic given its seed, so the numbers do not depend on the number of workers.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sharpness.curvature import HessianOperator, bulk_ratio, m_sharpness, top_eigenvalues
from sharpness.data import load_dataset
from sharpness.experiments.config import RunConfig
from sharpness.experiments.figures import (
    accuracy_errorbar,
    integer_ticks,
    optimizer_colour,
    panels,
    pyplot,
    save_figure,
    styled,
)
from sharpness.experiments.runner import build_trainer
from sharpness.experiments.stats import kendall_tau, mean_ci95
from sharpness.reproductions.base import Check, Findings, Paper, Reproduction, output_folder

plt = pyplot()

NAME = "sam"
TITLE = "SAM: better generalisation, robustness to label noise, flatter minima, m-sharpness"
REFERENCE = "Foret, Kleiner, Mobahi & Neyshabur, ICLR 2021, arXiv 2010.01412"
PAPER = Paper(NAME, TITLE, REFERENCE)


BASE = RunConfig(dataset="mnist1d", model="cnn1d", lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=64)


@dataclass(frozen=True)
class Plan:
    """The settings of the experiment: :data:`FULL`, :data:`QUICK`, or your own (``run(..., plan=...)``)."""

    seeds: int
    num_samples: int  # MNIST-1D examples generated, 80% for training (the standard set: 5000)
    epochs: int
    noise_levels: tuple[float, ...]  # 0 is the clean comparison
    micro_batches: tuple[int, ...]  # m of the m-SAM runs (clean); the batch size itself is plain SAM
    measure_size: int  # training examples the curvature and m-sharpness are measured on
    measure_m: tuple[int, ...]  # batch sizes of the measured m-sharpness; the last is the whole measurement set
    sharpness_steps: int  # projected-ascent steps of each worst-case ρ-sharpness
    rho_clean: float = 0.05  # SAM and m-SAM on clean labels, and the measured m-sharpness (the paper's CIFAR-10 ρ)
    rho_noise: float = 0.1  # SAM under label noise (the paper's choice there)

    def __post_init__(self) -> None:
        problems = []
        if 0.0 not in self.noise_levels or not any(n > 0 for n in self.noise_levels):
            problems.append(f"noise_levels must hold 0 and at least one level > 0, got {self.noise_levels}")
        if not self.micro_batches or not all(1 <= m < BASE.batch_size for m in self.micro_batches):
            problems.append(f"micro_batches must name m values in [1, {BASE.batch_size}), got {self.micro_batches}")
        if len(self.measure_m) < 2 or max(self.measure_m) > self.measure_size:
            problems.append(f"measure_m needs two or more sizes <= measure_size, got {self.measure_m}")
        if self.seeds < 1:
            problems.append(f"seeds must be >= 1, got {self.seeds}")
        if problems:
            raise ValueError("sam reproduction plan: " + "; ".join(problems))


FULL = Plan(
    seeds=3,
    num_samples=5000,
    epochs=60,
    noise_levels=(0.0, 0.2, 0.4, 0.6),
    micro_batches=(8, 16, 32),
    measure_size=1024,
    measure_m=(8, 32, 128, 1024),
    sharpness_steps=10,
)
QUICK = Plan(  # the same schedule on a smaller training set
    seeds=2,
    num_samples=1500,
    epochs=60,
    noise_levels=(0.0, 0.4),
    micro_batches=(32,),
    measure_size=256,
    measure_m=(8, 256),
    sharpness_steps=5,
)
LANCZOS = {"k": 5, "tol": 1e-4, "num_matvecs": 100}


@dataclass(frozen=True)
class Job:
    """One training run; ``measure`` is the measurement plan for clean runs, ``None`` otherwise."""

    config: RunConfig
    num_samples: int
    measure: Plan | None


def _run_job(job: Job) -> dict[str, Any]:
    """Train one run (single-threaded) and, for clean runs, measure its Hessian spectrum and m-sharpness."""
    torch.set_num_threads(1)
    config = job.config
    data = load_dataset("mnist1d", seed=config.seed, label_noise=config.label_noise, num_samples=job.num_samples)
    trainer = build_trainer(config, data)
    trainer.fit()
    result: dict[str, Any] = {"final": trainer.final_metrics()}
    if job.measure is not None:
        result.update(_measure(trainer.model, data, job.measure, config.seed))
    return result


def _measure(model: torch.nn.Module, data: Any, plan: Plan, seed: int) -> dict[str, Any]:
    """Top-5 Hessian eigenvalues and the m-sharpness at every ``plan.measure_m`` on the first training examples."""
    x, y = data.x_train[: plan.measure_size], data.y_train[: plan.measure_size]
    loss_fn = torch.nn.functional.cross_entropy
    eig = top_eigenvalues(
        HessianOperator(model, loss_fn, (x, y)), **LANCZOS, generator=torch.Generator().manual_seed(seed)
    )
    sharpness = {
        str(m): m_sharpness(
            model,
            loss_fn,
            x,
            y,
            m,
            plan.rho_clean,
            steps=plan.sharpness_steps,
            generator=torch.Generator().manual_seed(seed),
        ).value
        for m in plan.measure_m
    }
    eigenvalues = [float(v) for v in eig.eigenvalues]
    return {
        "eigenvalues": eigenvalues,
        "eigen_converged": bool(all(eig.converged)),
        "lambda_max": eigenvalues[0],
        "bulk_ratio": bulk_ratio(eigenvalues),
        "m_sharpness": sharpness,
    }


def _train_all(jobs: list[Job], workers: int) -> list[dict[str, Any]]:
    if workers <= 1:
        threads = torch.get_num_threads()
        try:
            return [_run_job(job) for job in jobs]
        finally:
            torch.set_num_threads(threads)  # the runs are single-threaded; the caller's setting is put back
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_run_job, jobs))


Group = tuple[str, float, int | None]
"""A group of runs over seeds: (optimizer, label noise, m of m-SAM or ``None``)."""


def _plan_jobs(plan: Plan, seed: int) -> dict[Group, list[Job]]:
    """Runs by (optimizer, label noise, m); seeds ``seed, seed + 1, ...`` (the init, data order and label noise)."""
    groups: dict[Group, list[Job]] = {}
    for noise in plan.noise_levels:
        for optimizer in ("sgd", "sam"):
            groups[(optimizer, noise, None)] = []
    for m in plan.micro_batches:
        groups[("sam", 0.0, m)] = []
    for (optimizer, noise, m), jobs in groups.items():
        rho = plan.rho_clean if noise == 0 else plan.rho_noise
        for s in range(plan.seeds):
            config = replace(BASE, optimizer=optimizer, rho=rho, label_noise=noise, micro_batch=m, seed=seed + s,
                             epochs=plan.epochs)  # fmt: skip
            jobs.append(Job(config.validate(), plan.num_samples, plan if noise == 0 else None))
    return groups


def _label(optimizer: str, m: int | None) -> str:
    return "SGD" if optimizer == "sgd" else ("SAM" if m is None else f"m-SAM m={m}")


def _stat(values: list[float]) -> dict[str, float]:
    mean, half = mean_ci95(values)
    return {"mean": mean, "ci95": half, "values": values}


def _pm(stat: dict[str, float], scale: float = 100.0, digits: int = 2) -> str:
    half = "n/a" if math.isnan(stat["ci95"]) else f"{scale * stat['ci95']:.{digits}f}"
    return f"{scale * stat['mean']:.{digits}f} ± {half}"


def _train_groups(groups: dict[Group, list[Job]], workers: int) -> dict[Group, list[dict[str, Any]]]:
    """Train every job of ``groups`` (in ``workers`` processes); their results, grouped as the jobs are."""
    flat = [job for jobs in groups.values() for job in jobs]
    results = iter(_train_all(flat, workers))
    return {key: [next(results) for _ in jobs] for key, jobs in groups.items()}


def _test_accuracies(runs: dict[Group, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Test accuracy over seeds (mean, 95% CI, values) of SGD and SAM at every noise level, e.g. ``"SAM noise=0.4"``."""
    return {
        f"{_label(opt, m)} noise={noise:g}": _stat([r["final"]["test_acc"] for r in group])
        for (opt, noise, m), group in runs.items()
        if m is None
    }


# ---------------------------------------------------------------------------------------------- the claims
def sam_beats_sgd(plan: Plan, accuracy: dict[str, dict[str, Any]], out_dir: Path) -> Findings:
    """Claims (1a), (1b): SAM's test accuracy is above SGD's, on clean labels and at every level of label noise (the
    paper's Table 1 and its label-noise table), by the paired gain over seeds."""
    # Seed s gives SGD and SAM the same initial weights, batch order and noisy labels: compare them in pairs.
    gain = {
        noise: _stat([b - a for a, b in zip(accuracy[f"SGD noise={noise:g}"]["values"],
                                            accuracy[f"SAM noise={noise:g}"]["values"], strict=True)])
        for noise in plan.noise_levels
    }  # fmt: skip

    def gain_above_zero(noise: float) -> bool:  # a t-interval over 2 seeds (t = 12.7) tests nothing
        return gain[noise]["mean"] - (_half(gain[noise]) if plan.seeds >= 3 else 0.0) > 0

    def detail(noise: float) -> str:
        return (
            f"SGD {_pm(accuracy[f'SGD noise={noise:g}'])}, SAM {_pm(accuracy[f'SAM noise={noise:g}'])}, "
            f"paired gain {_pm(gain[noise])} points"
        )

    paired = (
        f"the 95% CI of the paired gain SAM − SGD (same seed) lies above 0 ({plan.seeds} seeds)"
        if plan.seeds >= 3
        else f"the mean paired gain SAM − SGD (same seed) is > 0 ({plan.seeds} seeds: too few for a CI test)"
    )
    noisy = [n for n in plan.noise_levels if n > 0]
    checks = [
        Check(f"(1a) clean MNIST-1D: SAM (ρ={plan.rho_clean:g}) is more accurate than SGD: {paired}",
              gain_above_zero(0.0), f"test accuracy % (mean ± 95% CI): {detail(0.0)}"),
        Check(
            f"(1b) under symmetric label noise ({', '.join(f'{n:.0%}' for n in noisy)}) SAM (ρ={plan.rho_noise:g}) is "
            f"more accurate than SGD at every level: {paired}",
            all(gain_above_zero(n) for n in noisy),
            "; ".join(f"{n:.0%}: {detail(n)}" for n in noisy),
        ),
    ]  # fmt: skip
    numbers = {
        "test_accuracy": accuracy,
        "paired_gain_sam_minus_sgd": {f"noise={noise:g}": stat for noise, stat in gain.items()},
    }
    return Findings(checks, [_noise_figure(out_dir / "label_noise.png", plan, accuracy)], numbers)


def sam_flattens_hessian(plan: Plan, clean: dict[str, list[dict[str, Any]]], out_dir: Path) -> Findings:
    """Claim (2): at the end of training on clean labels SAM's Hessian is flatter than SGD's, lower mean λ_max and
    lower mean λ_max/λ_5 (the paper's Figure 3, left)."""
    spectrum = {
        label: {
            "lambda_max": _stat([r["lambda_max"] for r in group]),
            "bulk_ratio": _stat([r["bulk_ratio"] for r in group]),
            "eigenvalues_mean": np.mean([r["eigenvalues"] for r in group], axis=0).tolist(),
            "all_converged": all(r["eigen_converged"] for r in group),
        }
        for label, group in clean.items()
    }
    sgd_s, sam_s = spectrum["SGD"], spectrum["SAM"]
    check = Check(
        f"(2) at the end of training the Hessian (training loss, {plan.measure_size} training examples) is "
        "flatter with SAM: lower mean λ_max and lower mean λ_max/λ_5 than SGD",
        sam_s["lambda_max"]["mean"] < sgd_s["lambda_max"]["mean"]
        and sam_s["bulk_ratio"]["mean"] < sgd_s["bulk_ratio"]["mean"],
        f"λ_max: SGD {_pm(sgd_s['lambda_max'], 1, 3)}, SAM {_pm(sam_s['lambda_max'], 1, 3)}; λ_max/λ_5: "
        f"SGD {_pm(sgd_s['bulk_ratio'], 1, 3)}, SAM {_pm(sam_s['bulk_ratio'], 1, 3)}",
    )
    figure = _spectrum_figure(out_dir / "hessian_spectrum.png", spectrum)
    return Findings([check], [figure], {"spectrum": spectrum})


def m_sharpness_claims(
    plan: Plan, accuracy: dict[str, dict[str, Any]], clean: dict[str, list[dict[str, Any]]], out_dir: Path
) -> Findings:
    """Claims (3a), (3b) (§4.1, the paper's Figure 3, right): m-SAM with a small ``m`` generalises better than plain
    SAM, and the measured m-sharpness ``S_m`` at a small ``m`` ranks the clean models by their generalisation gap
    (Kendall τ_b) better than at the size of the whole measurement set."""
    batch = BASE.batch_size
    m_values = [*plan.micro_batches, batch]
    m_accuracy = {m: accuracy["SAM noise=0"] if m == batch else _stat(
        [r["final"]["test_acc"] for r in clean[_label("sam", m)]]) for m in m_values}  # fmt: skip
    smallest = min(plan.micro_batches)
    models = [r for group in clean.values() for r in group]
    gaps = [r["final"]["gap"] for r in models]
    tau = {m: kendall_tau([r["m_sharpness"][str(m)] for r in models], gaps) for m in plan.measure_m}
    small_m, full_m = plan.measure_m[0], plan.measure_m[-1]
    checks = [
        Check(
            f"(3a) m-SAM: perturbing per micro-batch of m={smallest} examples generalises better than plain SAM "
            f"(m = the batch size {batch}): higher mean test accuracy",
            m_accuracy[smallest]["mean"] > m_accuracy[batch]["mean"],
            "test accuracy %: " + ", ".join(f"m={m}: {_pm(m_accuracy[m])}" for m in m_values),
        ),
        Check(
            f"(3b) m-sharpness with small m predicts the generalisation gap (train − test accuracy) better than "
            f"sharpness of the whole measurement set: Kendall τ(m={small_m}) > 0 and > τ(m={full_m}), over the "
            f"{len(models)} clean models (SGD, SAM, m-SAM)",
            tau[small_m] > 0 and tau[small_m] > tau[full_m],
            "Kendall τ(m-sharpness, gap): " + ", ".join(f"m={m}: {t:+.3f}" for m, t in tau.items()),
        ),
    ]
    figure = _m_figure(out_dir / "m_sharpness.png", m_accuracy, tau, models, small_m, accuracy["SGD noise=0"])
    numbers = {
        "m_sam_test_accuracy": {str(m): stat for m, stat in m_accuracy.items()},
        "kendall_tau_m_sharpness_gap": {str(m): t for m, t in tau.items()},
    }
    return Findings(checks, [figure], numbers)


def _models_record(groups: dict[Group, list[Job]], runs: dict[Group, list[dict[str, Any]]]) -> Findings:
    """Every clean model's seed, accuracies, gap and measurements; every noisy run's accuracies."""
    clean_models = [
        {
            "label": _label(opt, m),
            "seed": job.config.seed,
            **{key: r["final"][key] for key in ("gap", "test_acc", "train_acc")},
            **{key: r[key] for key in ("lambda_max", "bulk_ratio", "m_sharpness")},
        }
        for (opt, noise, m), jobs in groups.items()
        if noise == 0
        for job, r in zip(jobs, runs[(opt, noise, m)], strict=True)
    ]
    noisy_runs = {
        f"{_label(opt, m)} noise={noise:g}": [
            {key: r["final"][key] for key in ("test_acc", "train_acc", "train_clean_acc")} for r in group
        ]
        for (opt, noise, m), group in runs.items()
        if noise > 0
    }
    return Findings(numbers={"clean_models": clean_models, "noisy_runs": noisy_runs})


# ---------------------------------------------------------------------------------------------- run
def _settings_record(plan: Plan, seed: int, quick: bool, workers: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "quick": quick,
        "seeds": [seed + s for s in range(plan.seeds)],
        "plan": {key: list(value) if isinstance(value, tuple) else value for key, value in vars(plan).items()},
        "training": (
            f"mnist1d ({plan.num_samples} examples, the standard 80/20 train/test split), cnn1d, SGD momentum "
            f"{BASE.momentum}, lr {BASE.lr} cosine, "
            f"weight decay {BASE.weight_decay}, batch {BASE.batch_size}, {plan.epochs} epochs"
        ),
        "lanczos": LANCZOS,
        "workers": workers,
    }


def _assumptions(plan: Plan) -> list[str]:
    """The settings the paper does not pin down."""
    return [
        "MNIST-1D with the cnn1d network stands in for the paper's CIFAR / ImageNet models (WRN, PyramidNet, "
        "ResNet), with `sharpness compare`'s default hyper-parameters (not tuned); the quick version generates "
        f"{QUICK.num_samples} MNIST-1D examples instead of 5000 (lower accuracies, same schedule)",
        f"ρ = {plan.rho_clean:g} on clean data and {plan.rho_noise:g} under label noise (the paper's CIFAR-10 choices; "
        "not tuned on a validation split here)",
        "label noise: symmetric, exactly that fraction of training labels replaced by a different class drawn "
        "uniformly (deterministic per seed); test labels are clean",
        "the paper's spectrum is measured on WRN without BatchNorm; cnn1d has no normalisation layers either; "
        f"the Hessian is of the mean cross-entropy on the first {plan.measure_size} training examples, without "
        "weight decay",
        f"m-SAM runs use ρ = {plan.rho_clean:g}; m-sharpness is measured with worst-case ρ-sharpness "
        f"(ρ = {plan.rho_clean:g}, L2 ball, {plan.sharpness_steps} projected-ascent steps) on disjoint batches of "
        f"the first {plan.measure_size} training examples; the largest m is the whole measurement set",
        "the generalisation gap is train accuracy − test accuracy at the end of training; the rank agreement is "
        "Kendall's τ_b (the paper plots a correlation; its exact statistic is not pinned down here)",
    ]


def run(out_dir: Path, quick: bool, seed: int, *, workers: int | None = None, plan: Plan | None = None) -> Reproduction:
    """Run the SAM reproduction; figures go to ``out_dir``.

    ``workers``: parallel training processes (default: the CPU count, at most 2 per the project's 2-core target;
    1 trains in this process). ``plan``: the settings (default :data:`QUICK` or :data:`FULL` as ``quick`` says);
    e.g. ``dataclasses.replace(FULL, rho_noise=0.05, seeds=5)``.
    """
    out_dir = output_folder(out_dir)
    plan = plan if plan is not None else (QUICK if quick else FULL)
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    groups = _plan_jobs(plan, seed)
    runs = _train_groups(groups, workers)
    accuracy = _test_accuracies(runs)
    clean = {_label(opt, m): group for (opt, noise, m), group in runs.items() if noise == 0}
    findings = Findings().add(
        sam_beats_sgd(plan, accuracy, out_dir),
        sam_flattens_hessian(plan, clean, out_dir),
        m_sharpness_claims(plan, accuracy, clean, out_dir),
        _models_record(groups, runs),
    )
    return PAPER.reproduction(findings, _settings_record(plan, seed, quick, workers), _assumptions(plan))


# ---------------------------------------------------------------------------------------------- figures
def _half(stat: dict[str, float]) -> float:
    """The CI half-width, 0 for a single seed (then a comparison falls back to the mean)."""
    return 0.0 if math.isnan(stat["ci95"]) else stat["ci95"]


def _errorbar(ax, xs, stats, **kwargs) -> None:
    """Test accuracy % at ``xs``: the mean over seeds with its 95% CI, bars cut to [0, 100] % (none for one seed)."""
    accuracy_errorbar(ax, xs, [100 * s["mean"] for s in stats], [100 * _half(s) for s in stats], **kwargs)


@styled
def _noise_figure(path: Path, plan: Plan, accuracy: dict[str, dict]) -> Path:
    fig, ax = panels()
    levels = list(plan.noise_levels)
    for name in ("SGD", "SAM"):
        stats = [accuracy[f"{name} noise={n:g}"] for n in levels]
        _errorbar(ax, [100 * n for n in levels], stats, label=name, color=optimizer_colour(name))
    ax.set_xlabel("label noise (% of training labels)")
    ax.set_ylabel("test accuracy % (mean ± 95% CI)")
    ax.set_title("MNIST-1D, cnn1d: SGD vs SAM under label noise")
    ax.legend()
    return save_figure(fig, path)


@styled
def _spectrum_figure(path: Path, spectrum: dict[str, dict]) -> Path:
    fig, ax = panels()
    for label, entry in spectrum.items():
        values = entry["eigenvalues_mean"]
        ax.plot(range(1, len(values) + 1), values, marker="o", label=label, color=optimizer_colour(label))
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index i")
    integer_ticks(ax)
    ax.set_ylabel("λ_i (mean over seeds)")
    ax.set_title("Top Hessian eigenvalues at the end of training")
    ax.legend()
    return save_figure(fig, path)


@styled
def _m_figure(path: Path, m_accuracy, tau, models, small_m: int, sgd: dict) -> Path:
    fig, axes = panels(1, 3)
    ms = list(m_accuracy)
    _errorbar(axes[0], ms, [m_accuracy[m] for m in ms], label="m-SAM", color=optimizer_colour("m-SAM"))
    axes[0].axhline(100 * sgd["mean"], color=optimizer_colour("sgd"), linestyle="--", label="SGD")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("m (examples per perturbation)")
    axes[0].set_ylabel("test accuracy % (mean ± 95% CI)")
    axes[0].legend()
    axes[1].plot(list(tau), list(tau.values()), marker="o")
    axes[1].set_xscale("log", base=2)
    axes[1].axhline(0, color="gray", linewidth=0.8)
    axes[1].set_xlabel("m of the measured m-sharpness")
    axes[1].set_ylabel("Kendall τ with the generalisation gap")
    axes[2].scatter([r["m_sharpness"][str(small_m)] for r in models], [100 * r["final"]["gap"] for r in models])
    axes[2].set_xlabel(f"m-sharpness, m={small_m}")
    axes[2].set_ylabel("generalisation gap (accuracy points)")
    fig.suptitle("m-sharpness (clean MNIST-1D)")
    return save_figure(fig, path)
