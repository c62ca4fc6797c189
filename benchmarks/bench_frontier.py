"""The efficiency frontier of the SAM family on MNIST-1D: test accuracy (95% CI) against training cost relative to SGD.

Every variant is trained for ``--seeds`` seeds on clean labels and with ``--label-noise`` (default 0.3) of the training
labels replaced, on the CLI's MNIST-1D setting (``cnn1d`` or ``--model``, ``--epochs`` epochs, cosine schedule, batch
64) with a 10% validation split. Each variant has a small grid of hyper-parameters (ρ; LookSAM's α; LateSAM's start;
see :data:`VARIANTS`): every grid point is trained for every seed and the point with the best mean **validation**
accuracy is reported on the test set (never selected on test). Cost is the process CPU time of the training steps
(``train_cpu_seconds``) relative to SGD's on the same labels and model, timed in a separate phase under equal
conditions (``time_costs``: interleaved short runs of every variant's chosen setting in one process, single-threaded):
CPU time excludes waiting, but a loaded machine still inflates it (shared caches and cores), so the CPU times of the
accuracy runs, which shared the machine unevenly, are shown only for information, with their wall-clock and the
forward/backward passes per step (independent of the machine).
SAM-ON (``sam-norm``: ε on the normalisation layers' affine parameters only) needs normalisation layers, so it trains
``cnn1d-bn``, beside SGD and SAM on that model (``sgd-bn``, ``sam-bn``).

Runs are independent processes' work (``--jobs`` in parallel, each single-threaded) and are kept in ``--out``: a run
whose ``final.json`` exists is not trained again, so an interrupted benchmark resumes where it stopped. Prints a
table per label setting, writes ``benchmarks/results/frontier.json`` and ``frontier.png`` (the Pareto frontier).

    python benchmarks/bench_frontier.py [--epochs 60] [--seeds 5] [--jobs 2] [--variants sgd,sam,...] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import multiprocessing
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from sharpness.experiments.config import RunConfig
from sharpness.experiments.runner import FINAL_NAME, build_trainer, load_data, run_training
from sharpness.experiments.stats import mean_ci95
from sharpness.train import read_json

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS: dict[str, dict[str, Any]] = {
    # name: {"fixed": RunConfig fields, "grid": {field: values}}; every variant is selected over its grid on validation
    "sgd": {"fixed": {"optimizer": "sgd"}, "grid": {}},
    "sam": {"fixed": {"optimizer": "sam"}, "grid": {"rho": [0.05, 0.1, 0.2]}},
    "msam": {"fixed": {"optimizer": "msam"}, "grid": {"rho": [0.3, 1.0, 2.0]}},
    "latesam": {"fixed": {"optimizer": "latesam"}, "grid": {"rho": [0.05, 0.1], "sam_start": [0.5, 0.8]}},
    "lateaesam": {"fixed": {"optimizer": "lateaesam"}, "grid": {"rho": [0.05, 0.1], "sam_start": [0.5]}},
    # SAM-ON needs normalisation layers: on cnn1d-bn, with SGD and SAM on the same model as its yardsticks
    "sgd-bn": {"fixed": {"optimizer": "sgd", "model": "cnn1d-bn"}, "grid": {}},
    "sam-bn": {"fixed": {"optimizer": "sam", "model": "cnn1d-bn"}, "grid": {"rho": [0.05, 0.1, 0.2]}},
    "sam-norm": {
        "fixed": {"optimizer": "sam", "perturb": "norm", "model": "cnn1d-bn"},
        "grid": {"rho": [0.05, 0.2, 0.5]},
    },
    "looksam": {"fixed": {"optimizer": "looksam"}, "grid": {"rho": [0.05, 0.1], "alpha": [0.3, 0.7]}},
    "aesam": {"fixed": {"optimizer": "aesam"}, "grid": {"rho": [0.05, 0.1]}},
    "aelooksam": {"fixed": {"optimizer": "aelooksam"}, "grid": {"rho": [0.05, 0.1]}},
    "randomsam": {"fixed": {"optimizer": "randomsam"}, "grid": {"rho": [0.05, 0.1]}},
}


def grid_points(variant: str) -> list[dict[str, Any]]:
    """Every combination of the variant's grid values (one point for a variant without a grid)."""
    grid = VARIANTS[variant]["grid"]
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def point_label(variant: str, point: dict[str, Any]) -> str:
    return "-".join([variant, *(f"{key}{value:g}" for key, value in point.items())])


def plan(args: argparse.Namespace) -> list[tuple[RunConfig, Path]]:
    """Every run of the benchmark and its folder: variants × grid points × label settings × seeds."""
    runs = []
    for variant, noise, seed in itertools.product(args.variants, (0.0, args.label_noise), range(args.seeds)):
        for point in grid_points(variant):
            fields = {**VARIANTS[variant]["fixed"], **point}
            fields.setdefault("model", args.model)
            config = RunConfig(
                dataset="mnist1d", epochs=args.epochs, seed=seed, label_noise=noise, val_split=0.1, threads=1, **fields
            )
            runs.append((config, args.out / f"noise{noise:g}" / point_label(variant, point) / f"seed{seed}"))
    return runs


def train_one(job: tuple[RunConfig, Path]) -> str:
    """Train one run into its folder unless it has finished (a process of the pool; single-threaded)."""
    config, run_dir = job
    if not (run_dir / FINAL_NAME).is_file():
        torch.set_num_threads(1)
        run_training(config, run_dir, resume=(run_dir / "checkpoint.pt").is_file())
    return str(run_dir)


def collect(args: argparse.Namespace, noise: float) -> list[dict[str, Any]]:
    """One row per variant: the grid point with the best mean validation accuracy and its test figures."""
    rows = []
    for variant in args.variants:
        best = None
        for point in grid_points(variant):
            folder = args.out / f"noise{noise:g}" / point_label(variant, point)
            finals = [read_json(folder / f"seed{seed}" / FINAL_NAME) for seed in range(args.seeds)]
            val = sum(final["val_acc"] for final in finals) / len(finals)
            if best is None or val > best[0]:
                best = (val, point, finals)
        val, point, finals = best
        row = {"variant": variant, "chosen": point, "val_acc": val, "seeds": len(finals)}
        for key in ("test_acc", "train_cpu_seconds", "train_seconds", "passes_per_step", "sam_fraction"):
            row[f"{key}_mean"], row[f"{key}_ci95"] = mean_ci95([final[key] for final in finals])
        rows.append(row)
    for row in rows:
        sgd = _yardstick(rows, row)
        for key in ("train_cpu_seconds", "train_seconds"):
            row[f"{key}_x_sgd"] = row[f"{key}_mean"] / sgd[f"{key}_mean"] if sgd else None
    return rows


def _yardstick(rows: list[dict[str, Any]], row: dict[str, Any]) -> dict[str, Any] | None:
    """SGD's row on the same model as ``row`` (``sgd-bn`` for the cnn1d-bn variants)."""
    name = "sgd-bn" if row["variant"].endswith(("-bn", "-norm")) else "sgd"
    return next((other for other in rows if other["variant"] == name), None)


def time_costs(args: argparse.Namespace, noise: float, rows: list[dict[str, Any]]) -> None:
    """CPU seconds of each row's chosen setting, timed under equal conditions: ``--cost-repeats`` interleaved rounds
    of a short run (``--cost-epochs`` epochs, seed 0) of every variant in this process, the first variant rotated per
    round; the median per variant, relative to SGD's, is ``cost_x_sgd`` (the runs of the accuracy phase shared the
    machine with each other and with whatever else ran, which inflates their CPU times unevenly)."""
    configs = {}
    for row in rows:
        fields = {**VARIANTS[row["variant"]]["fixed"], **row["chosen"]}
        fields.setdefault("model", args.model)
        configs[row["variant"]] = RunConfig(
            dataset="mnist1d", epochs=args.cost_epochs, seed=0, label_noise=noise, val_split=0.1, threads=1, **fields
        )
    data = load_data(next(iter(configs.values())))
    times: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    for repeat in range(args.cost_repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            trainer = build_trainer(configs[name], data)
            trainer.fit()
            times[name].append(trainer.state.train_cpu_seconds)
    for row in rows:
        row["cost_cpu_seconds"] = statistics.median(times[row["variant"]])
    for row in rows:
        sgd = _yardstick(rows, row)
        row["cost_x_sgd"] = row["cost_cpu_seconds"] / sgd["cost_cpu_seconds"] if sgd else None


def format_rows(rows: list[dict[str, Any]], noise: float) -> str:
    header = f"{'variant':<10} {'chosen on validation':<24} {'test acc % (95% CI)':>20} {'CPU ×SGD':>8} "
    header += f"{'(runs)':>7} {'wall ×SGD (runs)':>16} {'passes/step':>11} {'SAM frac':>8}"
    lines = [f"label noise {noise:g}", header, "-" * len(header)]
    for row in rows:
        chosen = ", ".join(f"{key}={value:g}" for key, value in row["chosen"].items()) or "-"
        lines.append(
            f"{row['variant']:<10} {chosen:<24} "
            f"{100 * row['test_acc_mean']:>12.2f} ± {100 * row['test_acc_ci95']:<5.2f} "
            f"{_ratio(row.get('cost_x_sgd')):>8} {_ratio(row['train_cpu_seconds_x_sgd']):>7} "
            f"{_ratio(row['train_seconds_x_sgd']):>16} "
            f"{row['passes_per_step_mean']:>11.2f} {row['sam_fraction_mean']:>8.2f}"
        )
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def draw(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Test accuracy (95% CI) against CPU cost relative to SGD, one panel per label setting."""
    from sharpness.experiments.figures import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, (setting, rows) in zip(axes[0], results.items(), strict=True):
        for row in rows:
            x = row["cost_x_sgd"]
            ax.errorbar(x, 100 * row["test_acc_mean"], yerr=100 * row["test_acc_ci95"], fmt="o", capsize=3)
            ax.annotate(row["variant"], (x, 100 * row["test_acc_mean"]), textcoords="offset points", xytext=(5, 4))
        ax.set_xlabel("training CPU time relative to SGD (timed under equal conditions)")
        ax.set_ylabel("test accuracy % (mean, 95% CI over seeds)")
        ax.set_title(setting)
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--label-noise", type=float, default=0.3)
    parser.add_argument("--model", default=None, help="built-in model (default: MNIST-1D's, cnn1d)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2, help="runs trained in parallel, each single-threaded")
    parser.add_argument("--cost-epochs", type=int, default=6, help="epochs of each timed run of the cost phase")
    parser.add_argument("--cost-repeats", type=int, default=5, help="interleaved rounds of the cost phase")
    parser.add_argument("--out", type=Path, default=Path("runs/frontier"), help="run folders (kept; resumable)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 epochs, 2 seeds, results *_quick.*")
    parser.add_argument("--json", type=Path, default=None, help="default benchmarks/results/frontier.json")
    args = parser.parse_args()
    args.variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in args.variants if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    if args.quick:
        args.epochs, args.seeds, args.out = 3, 2, args.out.with_name(args.out.name + "-quick")
        args.cost_epochs, args.cost_repeats = 1, 1
    stem = "frontier_quick" if args.quick else "frontier"
    json_path = args.json or RESULTS / f"{stem}.json"
    started = time.perf_counter()
    jobs = plan(args)
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for done, _ in enumerate(pool.imap_unordered(train_one, jobs), start=1):
            print(f"\r{done}/{len(jobs)} runs", end="", flush=True)
    print()
    results = {f"label noise {noise:g}": collect(args, noise) for noise in (0.0, args.label_noise)}
    torch.set_num_threads(1)
    for rows, noise in zip(results.values(), (0.0, args.label_noise), strict=True):
        time_costs(args, noise, rows)
    for rows, noise in zip(results.values(), (0.0, args.label_noise), strict=True):
        print(format_rows(rows, noise), end="\n\n")
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": multiprocessing.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "grids": {name: VARIANTS[name] for name in args.variants},
        "results": results,
        "seconds": time.perf_counter() - started,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=2))
    draw(results, json_path.with_suffix(".png"))
    print(f"wrote {json_path} and {json_path.with_suffix('.png')} ({record['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
