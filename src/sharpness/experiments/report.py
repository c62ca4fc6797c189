"""Figures and an HTML report from a run folder (``sharpness report RUN_DIR``).

Everything is read from the folder's files (``config.json``, ``metrics.jsonl``, ``final.json`` and, for a
comparison, ``summary.json`` recomputed from its runs), so a report can be regenerated at any time. A report is one
self-contained page: its figures are PNG files beside it, nothing is fetched from the network. The figures' style
(sizes, fonts, one colour per optimizer) is :mod:`sharpness.experiments.figures`'; :func:`settings_table` and
:data:`PAGE_STYLE` are shared with the reproductions' reports.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from sharpness.experiments.compare import RUNS_DIR, SUMMARY_COLUMNS, SUMMARY_NAME, summarize, summary_cells
from sharpness.experiments.config import DEFAULT_MODELS
from sharpness.experiments.figures import (
    accuracy_errorbar,
    ci_band,
    figure_size,
    integer_ticks,
    optimizer_colour,
    panels,
    save_figure,
    styled,
)
from sharpness.experiments.runner import CONFIG_NAME, FINAL_NAME
from sharpness.train import read_json, write_json
from sharpness.train.checkpoint import nan_for_null
from sharpness.train.tracking import TRACKING_NAME

FIGURE_NAME, REPORT_NAME, SHARPNESS_FIGURE = "curves.png", "report.html", "sharpness.png"
FRONTIER_FIGURE = "frontier.png"
RISE = "sam_loss_rise"  # the epoch records' first-order sharpness estimate (sharpness.train.loop)
PAGE_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:.5em 0;max-width:100%;display:block;overflow-x:auto}"
    "td table{display:table}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;vertical-align:top;overflow-wrap:break-word}"
    "th{background:#f4f4f4}td.text,th.key,.claims td,.claims th{text-align:left}td table{margin:0;width:100%}"
    ".claims td:first-child{white-space:nowrap}"
    "img{max-width:100%;height:auto;display:block;margin:.5em 0}"
    "pre{background:#f6f6f6;padding:1em;overflow-x:auto;white-space:pre-wrap;overflow-wrap:anywhere}"
)
"""The CSS of every HTML report. Cells wrap at spaces and never split a number or a word (``break-word`` leaves a
column at least as wide as its longest word); a table wider than the page scrolls inside its own box."""


def _sharpness_section(tracked: bool) -> list[str]:
    if not tracked:
        return []
    return [
        "<h2>Sharpness</h2>",
        f'<img src="{SHARPNESS_FIGURE}" alt="sharpness against the stability edge" width="100%">',
        "<p>Top Hessian eigenvalue of the training loss on a fixed measurement set (Lanczos, warm-started; solid) "
        "and the stability edge of the optimizer (dashed; its kind in the legend): 2/η for GD, (2 + 2β)/η for "
        "momentum β, the SAM-edge ηλ(1 + ρλ/||g||) = 2 + 2β for SAM; for Adam the edge (2 + 2β₁)/((1 − β₁)η) applies "
        "to the preconditioned sharpness λ_max(P⁻¹H), plotted dotted (docs/curvature.md). Every edge grows as 1/η: "
        "where a schedule takes the learning rate to 0 (cosine, at its last step) the edge is ∞ (the weights no "
        "longer move, so no sharpness is unstable). The dashed curve then rises off the top of the panel and "
        "stops; a ▲ at the top marks a measurement whose edge is ∞.</p>",
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


def curve_band(runs: list[list[dict[str, Any]]], key: str) -> tuple[list[Any], np.ndarray, np.ndarray, np.ndarray]:
    """The epochs and, per epoch, the mean of metric ``key`` over ``runs`` with its 95% CI band: mean ± the
    half-width of the Student-t interval over the runs (:func:`~sharpness.experiments.stats.mean_ci95`, the interval
    of the summary table). Accuracies (``*_acc``) in %, the band cut to [0, 100]; no band (NaN) for one run."""
    length = min(len(run) for run in runs)
    scale, low, high = (100.0, 0.0, 100.0) if key.endswith("_acc") else (1.0, -math.inf, math.inf)
    columns = [[scale * run[i][key] for run in runs] for i in range(length)]
    mean, lower, upper = ci_band(columns, low, high)
    return [runs[0][i]["epoch"] for i in range(length)], mean, lower, upper


def _log_floor(bands: Any) -> float | None:
    """Half the smallest positive value of the means and lower band edges: the bottom of a log-scale panel."""
    values = [v for _, mean, lower, _ in bands for v in (*mean, *lower) if math.isfinite(v) and v > 0]
    return 0.5 * min(values) if values else None


def draw_curves(axes: Any, series: dict[str, list[list[dict[str, Any]]]], keys: list[str]) -> dict[str, dict]:
    """One line per label on each panel (``axes[i]`` shows ``keys[i]``): the mean over its runs, in the optimizer's
    colour, and with two or more runs a band of the 95% CI of that mean (:func:`curve_band`). On the log-scale
    training-loss panel an interval reaching 0 or below runs off the bottom. Returns ``{key: {label: band}}``."""
    bands: dict[str, dict] = {}
    for axis, key in zip(axes, keys, strict=True):
        bands[key] = {label: curve_band(runs, key) for label, runs in series.items() if key in runs[0][0]}
        log = key == "train_loss"
        floor = _log_floor(bands[key].values()) if log else None
        if log:
            axis.set_yscale("log")
        for label, (epochs, mean, lower, upper) in bands[key].items():
            count, colour = len(series[label]), optimizer_colour(label)
            axis.plot(epochs, mean, color=colour, label=f"{label} ({count} run{'s' if count > 1 else ''})")
            if count > 1:
                if floor is not None:  # below the panel, NaN (a gap) kept
                    lower = np.where(lower > 0, lower, np.where(np.isnan(lower), np.nan, floor / 10))
                axis.fill_between(epochs, lower, upper, color=colour, alpha=0.2, linewidth=0)
        if floor is not None:
            axis.set_ylim(bottom=floor)
        integer_ticks(axis)
        axis.set_xlabel("epoch")
    return bands


@styled
def _curves_figure(series: dict[str, list[list[dict[str, Any]]]], path: Path, title: str) -> None:
    """Test accuracy % (or loss), training loss and, when a run has it, SAM's loss rise L(w + ε) − L(w) per epoch;
    one line per label, mean over its runs with the band of its 95% CI (:func:`draw_curves`)."""
    first = next(iter(series.values()))[0][0]
    keys = ["test_acc" if "test_acc" in first else "test_loss", "train_loss"]
    keys += [RISE] if any(RISE in runs[0][0] for runs in series.values()) else []
    fig, axes = panels(1, len(keys))
    draw_curves(axes, series, keys)
    axes[0].set_ylabel("test accuracy %" if keys[0] == "test_acc" else "test loss")
    axes[1].set_ylabel("training loss (first pass, running mean)")
    if len(keys) == 3:
        axes[2].set_ylabel("L(w + ε) − L(w), mean over SAM steps")
    handles, labels = axes[0].get_legend_handles_labels()
    if any(len(runs) > 1 for runs in series.values()):
        from matplotlib.patches import Patch

        handles.append(Patch(color="grey", alpha=0.3, linewidth=0))
        labels.append("band: 95% CI of the mean over seeds")
    axes[0].legend(handles, labels)
    fig.suptitle(title)
    save_figure(fig, path)


@styled
def _frontier_figure(summary: dict[str, Any], path: Path, title: str) -> bool:
    """Test accuracy (mean over seeds ± half-width of its 95% CI, the table's; bars cut to [0, 100] %) against the
    cost of a step: forward/backward passes per step and, when SGD is compared and the runs recorded CPU time, the
    training CPU time relative to SGD's (the table's CPU × SGD); one colour per optimizer. False for regression."""
    rows = summary["rows"]
    if summary["task"] != "classification":
        return False
    sgd = next((r for r in rows if r["optimizer"] == "sgd"), {})
    costs = [("passes_per_step_mean", "forward/backward passes per step")]
    if sgd.get("train_cpu_seconds_mean") and all("train_cpu_seconds_mean" in r for r in rows):
        costs.append(("train_cpu_seconds_mean", "training CPU time / SGD's (means over seeds)"))
    fig, axes = panels(1, len(costs), sharey=True, squeeze=False)
    for axis, (key, xlabel) in zip(axes[0], costs, strict=True):
        for row in rows:
            x = row[key] / sgd[key] if key == "train_cpu_seconds_mean" else row[key]
            mean, half = 100 * row["test_acc_mean"], 100 * row["test_acc_ci95"]
            accuracy_errorbar(axis, [x], [mean], [half], color=optimizer_colour(row["optimizer"]),
                              linestyle="none", label=_row_label(row))  # fmt: skip
        axis.set_xlabel(xlabel)
    axes[0][0].set_ylabel("test accuracy % (mean ± 95% CI)")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.suptitle(title)
    save_figure(fig, path)
    return True


@styled
def _sharpness_figure(series: dict[str, Path], path: Path, title: str) -> bool:
    """λ_max (solid; λ_max(P⁻¹H) dotted for an adaptive optimizer) and the stability edge (dashed) per step, in each
    optimizer's colour; False when no run tracked sharpness. Where the learning rate reaches 0 the edge (∝ 1/η) is
    ∞: its curve stops and a ▲ at the top marks the measurement. The panel's top is cut at twice the larger of the
    largest sharpness and the median edge, so the edge's rise towards ∞ at the end of a schedule leaves the panel."""
    tracked = {label: file for label, file in series.items() if file.is_file()}
    if not tracked:
        return False
    fig, axis = panels(figsize=figure_size(1, 2.5))
    axis.set_yscale("log")
    sharpness, edges, infinite = [], [], []
    for label, file in tracked.items():
        rows = [nan_for_null(json.loads(line)) for line in file.read_text().splitlines() if line.strip()]
        steps, colour = [row["step"] for row in rows], optimizer_colour(label)
        sharpness += [row["lambda_max"] for row in rows]
        axis.plot(steps, [row["lambda_max"] for row in rows], color=colour, label=f"{label}: λ_max")
        if "preconditioned_lambda_max" in rows[-1]:  # adaptive optimizers: the edge is one of λ_max(P⁻¹H)
            preconditioned = [row.get("preconditioned_lambda_max", math.nan) for row in rows]
            sharpness += preconditioned
            axis.plot(steps, preconditioned, ":", color=colour, label=f"{label}: λ_max(P⁻¹H)")
        edge = [row["edge"] for row in rows]
        edges += edge
        axis.plot(steps, edge, "--", color=colour, label=f"{label}: edge ({rows[-1]['edge_kind']})")
        # lambda_over_edge is 0 exactly where the edge is infinite (learning rate 0; written as null)
        infinite.append(([row["step"] for row in rows if row.get("lambda_over_edge") == 0], colour, label))
    finite = [v for v in sharpness if math.isfinite(v) and v > 0]
    finite_edges = sorted(v for v in edges if math.isfinite(v) and v > 0)
    if finite:
        top = 2 * max(max(finite), finite_edges[len(finite_edges) // 2] if finite_edges else 0.0)
        axis.set_ylim(top=min(axis.get_ylim()[1], top))
    for index, (steps, colour, label) in enumerate(infinite):  # stacked below the top: one row per optimizer
        if steps:
            y = axis.get_ylim()[1] / 1.15 ** (index + 1)
            axis.plot(steps, [y] * len(steps), "^", color=colour, label=f"{label}: edge = ∞ (learning rate 0)")
    axis.set_xlabel("step")
    integer_ticks(axis)
    axis.set_ylabel("top eigenvalue of H (or P⁻¹H)")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle(title)
    save_figure(fig, path)
    return True


# ----------------------------------------------------------------------------- pages


def _row_label(row: dict[str, Any]) -> str:
    return row["optimizer"] + (f" ρ={row['rho']:g}" if row["rho"] is not None else "")


def _compare_report(out_dir: Path) -> list[Path]:
    summary = summarize(out_dir)
    write_json(summary, out_dir / SUMMARY_NAME)
    series = {
        _row_label(row): [read_metrics(out_dir / RUNS_DIR / name) for name in row["runs"]] for row in summary["rows"]
    }
    run = summary["config"]["run"]
    title = f"{run['dataset']} / {run['model'] or DEFAULT_MODELS[run['dataset']]}"
    _curves_figure(series, out_dir / FIGURE_NAME, title)
    frontier = _frontier_figure(summary, out_dir / FRONTIER_FIGURE, f"{title}: accuracy against cost")
    first_runs = {
        label: out_dir / RUNS_DIR / row["runs"][0] / TRACKING_NAME
        for label, row in zip(series, summary["rows"], strict=True)
    }
    tracked = _sharpness_figure(first_runs, out_dir / SHARPNESS_FIGURE, f"{title}: sharpness (first seed)")
    body = [
        f"<h1>sharpness compare: {html.escape(title)}</h1>",
        "<h2>Summary</h2>",
        _summary_table(summary),
        "<h2>Learning curves</h2>",
        f'<img src="{FIGURE_NAME}" alt="learning curves" width="100%">',
        "<p>Each line is the mean over an optimizer's seeds; the band around it is the 95% confidence interval of "
        "that mean (mean ± t<sub>0.975, n−1</sub> · standard error over the n seeds, the interval of the table; "
        "accuracy cut to [0, 100] %), drawn with two or more seeds. On the log-scale loss panel an interval "
        "reaching 0 runs off the bottom.</p>",
    ]
    if frontier:
        body += [
            "<h2>Accuracy against cost</h2>",
            f'<img src="{FRONTIER_FIGURE}" alt="accuracy against cost" width="100%">',
            "<p>Test accuracy (mean ± 95% CI over seeds, as in the table; bars cut to [0, 100] %) against the "
            "forward/backward passes per optimizer step and, when SGD is compared, the training CPU time relative "
            "to SGD's (the table's CPU × SGD: 2 means twice SGD's CPU time). Up and to the left is better.</p>",
        ]
    body += [
        *_sharpness_section(tracked),
        "<h2>Runs</h2>",
        _runs_table(out_dir),
        "<h2>Configuration</h2>",
        settings_table(summary["config"]),
    ]
    return _write_page(out_dir, title, body)


def _summary_table(summary: dict[str, Any]) -> str:
    """The comparison's table (the cells ``sharpness compare`` prints), a legend of its columns and the ρ chosen."""
    header, lines = summary_cells(summary)
    head = "".join(f'<th title="{html.escape(SUMMARY_COLUMNS.get(h, ""))}">{html.escape(h)}</th>' for h in header)
    rows = "".join(
        "<tr>"
        + "".join(f"<td{' class=text' if i == 0 else ''}>{html.escape(c)}</td>" for i, c in enumerate(cells))
        + "</tr>"
        for cells in lines
    )
    legend = "".join(
        f"<li><b>{html.escape(h)}</b>: {html.escape(SUMMARY_COLUMNS[h])}</li>"
        for h in dict.fromkeys(header)
        if h in SUMMARY_COLUMNS
    )
    classification = summary["task"] == "classification"
    chosen = "".join(
        f"<p>{html.escape(optimizer)}: ρ chosen on validation; mean {'val acc' if classification else '−val loss'} "
        + html.escape(", ".join(f"ρ={rho}: {score:.4f}" for rho, score in scores.items()))
        + "</p>"
        for optimizer, scores in summary["selection"].items()
    )
    return f"<table><tr>{head}</tr>{rows}</table>{chosen}<ul>{legend}</ul>"


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
        settings_table(final) if final else "<p>The run has not finished (no final.json).</p>",
        f'<img src="{FIGURE_NAME}" alt="learning curves" width="100%">',
        *_sharpness_section(tracked),
        "<h2>Configuration</h2>",
        settings_table(config),
    ]
    return _write_page(run_dir, title, body)


def _runs_table(out_dir: Path) -> str:
    rows = []
    for run_dir in sorted((out_dir / RUNS_DIR).iterdir()):
        final_path = run_dir / FINAL_NAME
        if not final_path.is_file():
            continue
        final = read_json(final_path)
        cells = [_fmt(final.get(key)) for key in ("test_acc", "test_loss", "train_loss", "gap", "passes_per_step")]
        rows.append(
            f"<tr><td class=text>{html.escape(run_dir.name)}</td>"
            + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
            + "</tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in ("run", "test acc", "test loss", "train loss", "gap", "passes/step"))
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def settings_table(values: dict[str, Any]) -> str:
    """``values`` as an HTML table of name and value, a nested dict as a table in its cell, a list as its items
    separated by commas; text as it is (``Σ``, not ``\\u03a3``), escaped for HTML."""
    rows = "".join(
        f"<tr><th class=key>{html.escape(str(key))}</th><td class=text>{_value_cell(value)}</td></tr>"
        for key, value in values.items()
    )
    return f"<table>{rows}</table>"


def _value_cell(value: Any) -> str:
    if isinstance(value, dict):
        return settings_table(value) if value else "-"
    if isinstance(value, list | tuple):
        if any(isinstance(item, dict | list | tuple) for item in value):
            return "<br>".join(_value_cell(item) for item in value)
        return html.escape(", ".join(_fmt(item) for item in value)) if value else "-"
    return html.escape(_fmt(value))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _write_page(folder: Path, title: str, body: list[str]) -> list[Path]:
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{PAGE_STYLE}</style></head><body>{''.join(body)}"
        f"<p><small>Regenerate with <code>sharpness report {html.escape(str(folder))}</code>.</small></p>"
        "</body></html>\n"
    )
    (folder / REPORT_NAME).write_text(page, encoding="utf-8")
    return [folder / FIGURE_NAME, folder / REPORT_NAME]
