"""Figures and an HTML report from a run folder (``sharpness report RUN_DIR``).

Everything is read from the folder's files (``config.json``, ``metrics.jsonl``, ``final.json`` and, for a
comparison, ``summary.json`` recomputed from its runs), so a report can be regenerated at any time.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from sharpness.experiments.compare import RUNS_DIR, SUMMARY_NAME, format_table, summarize
from sharpness.experiments.config import DEFAULT_MODELS
from sharpness.experiments.figures import pyplot, save_figure
from sharpness.experiments.runner import CONFIG_NAME, FINAL_NAME
from sharpness.train import read_json, write_json
from sharpness.train.checkpoint import nan_for_null
from sharpness.train.tracking import TRACKING_NAME

FIGURE_NAME, REPORT_NAME, SHARPNESS_FIGURE = "curves.png", "report.html", "sharpness.png"
RISE = "sam_loss_rise"  # the epoch records' first-order sharpness estimate (sharpness.train.loop)


def _sharpness_section(tracked: bool) -> list[str]:
    if not tracked:
        return []
    return [
        "<h2>Sharpness</h2>",
        "<p>Top Hessian eigenvalue of the training loss on a fixed measurement set (Lanczos, warm-started) and the "
        "stability edge of the optimizer (its kind in the legend): 2/η for GD, (2 + 2β)/η for momentum β, the "
        "SAM-edge ηλ(1 + ρλ/||g||) = 2 + 2β for SAM; for Adam the edge (2 + 2β₁)/((1 − β₁)η) applies to the "
        "preconditioned sharpness λ_max(P⁻¹H), plotted dotted (docs/curvature.md).</p>",
        f'<img src="{SHARPNESS_FIGURE}" alt="sharpness" width="100%">',
    ]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run folder's ``metrics.jsonl``; a ``null`` (a non-finite metric) reads as NaN."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as exc:
        raise ValueError(f"{path} is not readable JSON lines ({exc}); restore the file, or start a new run") from None
    return [nan_for_null(record) for record in records]


def write_report(run_dir: str | Path) -> list[Path]:
    """(Re)write the figure and ``report.html`` of a run or comparison folder; returns the written paths."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a sharpness run folder: {config_path} is missing")
    settings = read_json(config_path)
    kind = settings.get("kind") if isinstance(settings, dict) else None
    if kind == "compare":
        return _compare_report(run_dir)
    if kind == "train":
        return _train_report(run_dir)
    raise ValueError(f"{config_path} has unknown kind {kind!r} (expected 'train' or 'compare')")


# ----------------------------------------------------------------------------- figures


def _finish(fig, axes, title: str, path: Path) -> None:
    """Grid, legends and title, then save the figure to ``path`` and free it."""
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(title)
    save_figure(fig, path)


def _curves_figure(series: dict[str, list[list[dict[str, Any]]]], path: Path, title: str) -> None:
    """Test accuracy (or loss), training loss and, when a run has it, SAM's loss rise L(w + ε) − L(w) per epoch;
    one line per label, mean over its runs, min–max band."""
    plt = pyplot()
    first = next(iter(series.values()))[0][0]
    keys = ["test_acc" if "test_acc" in first else "test_loss", "train_loss"]
    keys += [RISE] if any(RISE in runs[0][0] for runs in series.values()) else []
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4))
    for index, (label, runs) in enumerate(series.items()):
        for axis, key in zip(axes, keys, strict=True):
            if key not in runs[0][0]:  # no loss rise: not a SAM-family optimizer
                continue
            length = min(len(run) for run in runs)
            epochs = [run[i]["epoch"] for run in runs[:1] for i in range(length)]
            values = [[run[i][key] for run in runs] for i in range(length)]
            mean = [sum(v) / len(v) for v in values]
            plural = "s" if len(runs) > 1 else ""
            (line,) = axis.plot(epochs, mean, color=f"C{index}", label=f"{label} ({len(runs)} run{plural})")
            if len(runs) > 1:
                axis.fill_between(
                    epochs, [min(v) for v in values], [max(v) for v in values], alpha=0.2, color=line.get_color()
                )
    axes[0].set_ylabel("test accuracy" if keys[0] == "test_acc" else "test loss")
    axes[1].set_ylabel("training loss (first pass, running mean)")
    axes[1].set_yscale("log")
    if len(keys) == 3:
        axes[2].set_ylabel("L(w + ε) − L(w), mean over SAM steps")
    for axis in axes:
        axis.set_xlabel("epoch")
    _finish(fig, axes, title, path)


# ----------------------------------------------------------------------------- pages


def _compare_report(out_dir: Path) -> list[Path]:
    summary = summarize(out_dir)
    write_json(summary, out_dir / SUMMARY_NAME)
    series = {}
    for row in summary["rows"]:
        label = row["optimizer"] + (f" ρ={row['rho']:g}" if row["rho"] is not None else "")
        series[label] = [read_metrics(out_dir / RUNS_DIR / name) for name in row["runs"]]
    run = summary["config"]["run"]
    title = f"{run['dataset']} / {run['model'] or DEFAULT_MODELS[run['dataset']]}"
    _curves_figure(series, out_dir / FIGURE_NAME, title)
    first_runs = {
        label: out_dir / RUNS_DIR / row["runs"][0] / TRACKING_NAME
        for label, row in zip(series, summary["rows"], strict=True)
    }
    tracked = _sharpness_figure(first_runs, out_dir / SHARPNESS_FIGURE, f"{title}: sharpness (first seed)")
    body = [
        f"<h1>sharpness compare: {html.escape(title)}</h1>",
        "<h2>Summary</h2>",
        f"<pre>{html.escape(format_table(summary))}</pre>",
        "<p>Test metric: mean over seeds ± half-width of the 95% Student-t interval. Gap: train − test accuracy "
        "(eval mode, on the training labels). Wall-clock and CPU s (this process's CPU time: time spent waiting for a "
        "shared CPU does not count): training steps only; × SGD: relative to SGD's mean. SAM frac: fraction of steps "
        "that took a second pass. L(w+ε)−L(w): the rise of the loss from w to SAM's perturbed weights in the last "
        "epoch (mean over its SAM steps), a first-order sharpness estimate that costs nothing.</p>",
        f'<img src="{FIGURE_NAME}" alt="learning curves" width="100%">',
        *_sharpness_section(tracked),
        "<h2>Runs</h2>",
        _runs_table(out_dir),
        "<h2>Configuration</h2>",
        f"<pre>{html.escape(json.dumps(summary['config'], indent=2))}</pre>",
    ]
    return _write_page(out_dir, title, body)


def _train_report(run_dir: Path) -> list[Path]:
    config = read_json(run_dir / CONFIG_NAME)
    title = f"{config['dataset']} / {config['model'] or DEFAULT_MODELS[config['dataset']]} / {config['optimizer']}"
    _curves_figure({config["optimizer"]: [read_metrics(run_dir)]}, run_dir / FIGURE_NAME, title)
    tracked = _sharpness_figure({config["optimizer"]: run_dir / TRACKING_NAME}, run_dir / SHARPNESS_FIGURE, title)
    final_path = run_dir / FINAL_NAME
    final = read_json(final_path) if final_path.is_file() else None
    body = [
        f"<h1>sharpness train: {html.escape(title)}</h1>",
        "<h2>Final metrics</h2>",
        _dict_table(final) if final else "<p>The run has not finished (no final.json).</p>",
        f'<img src="{FIGURE_NAME}" alt="learning curves" width="100%">',
        *_sharpness_section(tracked),
        "<h2>Configuration</h2>",
        _dict_table(config),
    ]
    return _write_page(run_dir, title, body)


def _runs_table(out_dir: Path) -> str:
    rows = []
    for run_dir in sorted((out_dir / RUNS_DIR).iterdir()):
        final_path = run_dir / FINAL_NAME
        if not final_path.is_file():
            continue
        final = read_json(final_path)
        cells = [run_dir.name] + [_fmt(final.get(key)) for key in ("test_acc", "test_loss", "train_loss", "gap")]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("run", "test acc", "test loss", "train loss", "gap"))
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _dict_table(values: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in values.items())
    return f"<table>{rows}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _sharpness_figure(series: dict[str, Path], path: Path, title: str) -> bool:
    """λ_max and the stability edge per step, one colour per run; False when no run tracked sharpness."""
    tracked = {label: file for label, file in series.items() if file.is_file()}
    if not tracked:
        return False
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(11, 4))
    for label, file in tracked.items():
        rows = [nan_for_null(json.loads(line)) for line in file.read_text().splitlines() if line.strip()]
        steps = [row["step"] for row in rows]
        (line,) = axis.plot(steps, [row["lambda_max"] for row in rows], label=f"{label}: λ_max")
        if "preconditioned_lambda_max" in rows[-1]:  # adaptive optimizers: the edge is one of λ_max(P⁻¹H)
            preconditioned = [row.get("preconditioned_lambda_max", math.nan) for row in rows]
            axis.plot(steps, preconditioned, ":", color=line.get_color(), label=f"{label}: λ_max(P⁻¹H)")
        kind = rows[-1]["edge_kind"]
        axis.plot(steps, [row["edge"] for row in rows], "--", color=line.get_color(), label=f"{label}: edge ({kind})")
    axis.set_xlabel("step")
    axis.set_ylabel("top eigenvalue of H (or P⁻¹H)")
    axis.set_yscale("log")
    _finish(fig, [axis], title, path)
    return True


def _write_page(folder: Path, title: str, body: list[str]) -> list[Path]:
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "pre{background:#f6f6f6;padding:1em;overflow-x:auto}"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}"
        f"<p><small>Regenerate with <code>sharpness report {html.escape(str(folder))}</code>.</small></p>"
        "</body></html>\n"
    )
    (folder / REPORT_NAME).write_text(page)
    return [folder / FIGURE_NAME, folder / REPORT_NAME]
