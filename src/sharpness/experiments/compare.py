"""Compare optimizers over seeds (``sharpness compare``), as the SAM paper reports its results.

Each (optimizer, ρ, seed) is one run folder under ``OUT/runs/``; seed ``s`` gives every optimizer the same
initial weights and data order. With a ρ grid, every ρ is trained for every seed and the ρ with the best mean
validation accuracy is reported on the test set (Foret et al. §3: ρ tuned on a 10% validation split). With
``equal_compute``, optimizers that take one pass per step get twice the epochs. :func:`summarize` reads the run
folders back, so a summary (and ``sharpness report``) can always be regenerated from the files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sharpness.experiments.config import CompareConfig, RunConfig
from sharpness.experiments.runner import CONFIG_NAME, FINAL_NAME, check_settings, run_training
from sharpness.experiments.stats import mean_ci95
from sharpness.optim.registry import RHO_OPTIMIZERS
from sharpness.train import CHECKPOINT_NAME, Callback, read_json, write_json
from sharpness.train.checkpoint import nan_for_null, remove_stale_temps
from sharpness.train.distributed import barrier, is_rank_zero, world

SUMMARY_NAME = "summary.json"
RUNS_DIR = "runs"


def run_label(config: RunConfig) -> str:
    rho = f"-rho{config.rho:g}" if config.optimizer in RHO_OPTIMIZERS else ""
    return f"{config.optimizer}{rho}-seed{config.seed}"


def plan_runs(config: CompareConfig) -> Iterator[RunConfig]:
    """Every run of the comparison, in the order they are trained: seed by seed, every optimizer (and ρ) of a seed
    before the next seed. The runs compared with each other thus train close together in time, so that a machine
    whose load changes during the comparison changes their times alike; and an interrupted comparison already
    holds every optimizer for its first seeds."""
    for seed in range(config.first_seed, config.first_seed + config.seeds):
        for optimizer in config.optimizers:
            if config.rho_grid and optimizer in RHO_OPTIMIZERS:
                for rho in config.rho_grid:
                    yield config.run_for(optimizer, rho=rho, seed=seed)
            else:
                yield config.run_for(optimizer, seed=seed)


def check_compare(config: CompareConfig, out_dir: str | Path, *, resume: bool, world_size: int = 1) -> None:
    """Every check made before anything is written: the settings (the global batch over ``world_size``
    processes too) and the folder (a resumed comparison's ``config.json`` must match ``config``)."""
    config.validate()
    check_settings(config.run, world_size)
    out_dir = Path(out_dir)
    if resume:
        saved = out_dir / CONFIG_NAME
        if not saved.is_file() or read_json(saved) != {"kind": "compare", **_describe(config)}:
            raise ValueError(f"cannot resume {out_dir}: its {CONFIG_NAME} is missing or has other settings")
    elif (out_dir / RUNS_DIR).exists():
        raise ValueError(f"{out_dir} already holds a comparison; use --resume to continue it, or another --out")


def compare(
    config: CompareConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    callbacks: Callable[[RunConfig], Sequence[Callback]] = lambda run: (),
) -> dict[str, Any]:
    """Train every planned run into ``out_dir/runs`` and write ``summary.json``; returns the summary.

    With ``resume=True`` finished runs are kept, interrupted ones continue from their checkpoints and missing
    ones are trained. ``callbacks(run_config)`` gives extra callbacks for each run (progress, tracking).
    In a process group of several processes every process calls this alike and trains every run with the
    others; rank 0 writes the folder and returns the summary, the other ranks return ``{}``.
    """
    out_dir = Path(out_dir)
    check_compare(config, out_dir, resume=resume, world_size=world()[1])
    barrier()  # every process has checked the folder before rank 0 writes into it
    if is_rank_zero():
        if resume:
            remove_stale_temps(out_dir)
        write_json({"kind": "compare", **_describe(config)}, out_dir / CONFIG_NAME)
    for run in plan_runs(config):
        run_dir = out_dir / RUNS_DIR / run_label(run)
        if (run_dir / FINAL_NAME).is_file():
            continue
        resume_run = resume and (run_dir / CHECKPOINT_NAME).is_file()
        run_training(run, run_dir, resume=resume_run, callbacks=callbacks(run))
    if not is_rank_zero():
        return {}
    summary = summarize(out_dir)
    write_json(summary, out_dir / SUMMARY_NAME)
    return summary


def _describe(config: CompareConfig) -> dict[str, Any]:
    described = dataclasses.asdict(config)
    described["run"].pop("threads")
    described["run"].pop("device")
    return described


# ----------------------------------------------------------------------------- summary


def load_runs(out_dir: Path) -> list[dict[str, Any]]:
    """The finished runs of a comparison folder: each its config, final metrics and label."""
    runs = []
    for run_dir in sorted((out_dir / RUNS_DIR).iterdir()):
        final = run_dir / FINAL_NAME
        if final.is_file():
            runs.append(
                {
                    "label": run_dir.name,
                    "config": read_json(run_dir / CONFIG_NAME),
                    "final": nan_for_null(read_json(final)),
                }
            )
    return runs


def summarize(out_dir: str | Path) -> dict[str, Any]:
    """Per optimizer: mean ± 95% CI over seeds of the test metric, and the other figures of the table.

    For a SAM-family optimizer trained over a ρ grid, the row is the ρ with the best mean validation accuracy
    (lowest validation loss for regression); ``selection`` lists the validation score of every ρ.
    """
    out_dir = Path(out_dir)
    described = read_json(out_dir / CONFIG_NAME)
    runs = load_runs(out_dir)
    if not runs:
        raise ValueError(f"{out_dir} has no finished runs under {RUNS_DIR}/")
    classification = "test_acc" in runs[0]["final"]
    rows, selection = [], {}
    for optimizer in described["optimizers"]:
        groups: dict[float, list[dict[str, Any]]] = {}
        for run in runs:
            if run["config"]["optimizer"] == optimizer:
                groups.setdefault(run["config"]["rho"], []).append(run)
        if not groups:
            continue
        if len(groups) > 1:
            scores = {rho: _validation_score(group, classification) for rho, group in groups.items()}
            selection[optimizer] = {f"{rho:g}": score for rho, score in sorted(scores.items())}
            chosen = max(scores, key=scores.__getitem__)
        else:
            chosen = next(iter(groups))
        rows.append(_row(optimizer, chosen, groups[chosen], classification))
    return {
        "task": "classification" if classification else "regression",
        "rows": rows,
        "selection": selection,
        "config": described,
    }


def _validation_score(group: list[dict[str, Any]], classification: bool) -> float:
    key = "val_acc" if classification else "val_loss"
    mean = sum(run["final"][key] for run in group) / len(group)
    return mean if classification else -mean


def _row(optimizer: str, rho: float, group: list[dict[str, Any]], classification: bool) -> dict[str, Any]:
    finals = [run["final"] for run in group]
    row: dict[str, Any] = {
        "optimizer": optimizer,
        "rho": rho if optimizer in RHO_OPTIMIZERS else None,
        "epochs": group[0]["config"]["epochs"],
        "seeds": len(group),
        "runs": [run["label"] for run in group],
    }
    metrics = ["test_acc", "test_loss", "train_loss", "train_acc", "gap", "train_seconds", "sam_fraction"]
    metrics += ["passes_per_step", "train_clean_acc", "val_acc", "val_loss", "train_cpu_seconds", "sam_loss_rise"]
    for key in metrics:
        values = [final[key] for final in finals if key in final]
        if len(values) == len(finals):
            row[f"{key}_mean"], row[f"{key}_ci95"] = mean_ci95(values)
    if not classification:
        row.pop("train_acc_mean", None)
    return row


SUMMARY_COLUMNS = {
    "optimizer": "the optimizer (its CLI name)",
    "rho": "SAM's ρ (for a ρ grid: the ρ chosen on validation)",
    "epochs": "epochs trained",
    "seeds": "runs (seeds) averaged",
    "test acc % (95% CI)": "test accuracy, mean over seeds ± half-width of the 95% Student-t interval",
    "test loss (95% CI)": "test loss, mean over seeds ± half-width of the 95% Student-t interval",
    "train loss": "final training loss (mean over seeds)",
    "gap": "train − test accuracy (eval mode, on the training labels)",
    "gap (pts)": "train − test accuracy in percentage points (eval mode, on the training labels)",
    "wall-clock s": "wall-clock seconds of the training steps (mean over seeds)",
    "CPU s": "this process's CPU seconds of the training steps (waiting for a shared CPU does not count)",
    "× SGD": "the column to its left over SGD's mean: the cost relative to SGD (1 = as costly as SGD)",
    "SAM frac": "fraction of steps that took SAM's second (perturbed) pass",
    "passes/step": "forward/backward passes per optimizer step: 1 for SGD, 2 for SAM, 1 + SAM frac for a policy",
    "L(w+ε)−L(w)": "rise of the loss from w to SAM's perturbed weights in the last epoch (mean over its SAM steps)",
}
"""What each column of :func:`summary_cells` means (the HTML report's legend)."""


def summary_cells(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The comparison's table as strings: the header and one row of cells per optimizer (see
    :data:`SUMMARY_COLUMNS`); :func:`format_table` prints it, the HTML report shows it."""
    classification = summary["task"] == "classification"
    header = ["optimizer", "rho", "epochs", "seeds"]
    header += ["test acc % (95% CI)"] if classification else ["test loss (95% CI)"]
    header += ["train loss", "gap" + (" (pts)" if classification else ""), "wall-clock s", "× SGD", "CPU s", "× SGD"]
    header += ["SAM frac", "passes/step", "L(w+ε)−L(w)"]
    sgd = next((r for r in summary["rows"] if r["optimizer"] == "sgd"), {})
    lines = []
    for row in summary["rows"]:
        if classification:
            main = f"{100 * row['test_acc_mean']:.2f} ± {100 * row['test_acc_ci95']:.2f}"
            gap = f"{100 * row['gap_mean']:.2f}"
        else:
            main = f"{row['test_loss_mean']:.4g} ± {row['test_loss_ci95']:.2g}"
            gap = f"{row['gap_mean']:.4g}"
        lines.append(
            [
                row["optimizer"],
                "-" if row["rho"] is None else f"{row['rho']:g}",
                str(row["epochs"]),
                str(row["seeds"]),
                main,
                f"{row['train_loss_mean']:.4f}",
                gap,
                *_seconds_cells(row, sgd, "train_seconds_mean"),
                *_seconds_cells(row, sgd, "train_cpu_seconds_mean"),
                f"{row['sam_fraction_mean']:.2f}",
                f"{row['passes_per_step_mean']:.2f}",
                f"{row['sam_loss_rise_mean']:.3g}" if "sam_loss_rise_mean" in row else "-",
            ]
        )
    return header, lines


def format_table(summary: dict[str, Any]) -> str:
    """The comparison as a plain-text table (what ``sharpness compare`` prints)."""
    classification = summary["task"] == "classification"
    header, lines = summary_cells(summary)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def render(cells: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    table = [render(header), "  ".join("-" * w for w in widths), *map(render, lines)]
    for optimizer, scores in summary["selection"].items():
        name = "val acc" if classification else "-val loss"
        table.append(
            f"{optimizer}: rho chosen on validation; mean {name} per rho: "
            + ", ".join(f"{rho}: {score:.4f}" for rho, score in scores.items())
        )
    return "\n".join(table)


def _seconds_cells(row: dict[str, Any], sgd: dict[str, Any], key: str) -> list[str]:
    """A time column's two cells: the mean seconds and their ratio to SGD's ("-" where a run lacks the time, e.g.
    ``train_cpu_seconds`` in runs written before it was recorded)."""
    if key not in row:
        return ["-", "-"]
    ratio = f"{row[key] / sgd[key]:.2f}" if sgd.get(key) else "-"
    return [f"{row[key]:.1f}", ratio]
