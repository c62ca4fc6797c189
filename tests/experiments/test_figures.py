"""The figure style (issue 17): bands and error bars are the tables' 95% CIs, accuracy bars stay in [0, 100] %,
counting axes have integer ticks, log axes plain labels, and an optimizer has one colour in every figure."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from sharpness.experiments import figures, report
from sharpness.experiments.figures import (
    OPTIMIZER_COLOURS,
    accuracy_errorbar,
    clip_interval,
    integer_ticks,
    optimizer_colour,
    plain_number,
    save_figure,
)

T_975_2 = 4.303  # Student's t quantile t_{0.975, 2} (3 seeds), from a printed table


def _runs(values: list[list[float]], key: str = "test_acc") -> list[list[dict]]:
    """One run per list of per-epoch values."""
    return [[{"epoch": i + 1, key: v, "train_loss": 1.0 / (i + 1)} for i, v in enumerate(run)] for run in values]


def _expected_band(values: list[list[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean ± t · sd/√n over the runs at each epoch, in %, cut to [0, 100] (computed here, not by the package)."""
    data = 100 * np.array(values)  # runs × epochs
    mean = data.mean(axis=0)
    half = T_975_2 * data.std(axis=0, ddof=1) / math.sqrt(data.shape[0])
    return mean, np.clip(mean - half, 0, 100), np.clip(mean + half, 0, 100)


def _visible_labels(axis) -> list[str]:
    low, high = sorted(axis.get_view_interval())
    ticks = [*axis.get_major_ticks(), *axis.get_minor_ticks()]
    return [t.label1.get_text() for t in ticks if t.label1.get_text() and low <= t.get_loc() <= high]


def _captured(monkeypatch: pytest.MonkeyPatch, module) -> list:
    """Replace ``module.save_figure`` by one that keeps the figure (laid out and drawn, not saved)."""
    kept = []

    def keep(fig, path, dpi=None):
        for ax in fig.axes:
            figures.readable_log_axis(ax)
        fig.canvas.draw()
        kept.append(fig)
        return path

    monkeypatch.setattr(module, "save_figure", keep)
    return kept


VALUES = [[0.60, 0.80, 0.99], [0.70, 0.85, 0.999], [0.65, 0.95, 0.90]]  # the last epoch's CI reaches above 100 %


def test_the_learning_curve_band_is_the_95_percent_ci_of_the_table() -> None:
    epochs, mean, lower, upper = report.curve_band(_runs(VALUES), "test_acc")
    expected = _expected_band(VALUES)
    assert epochs == [1, 2, 3]
    np.testing.assert_allclose(mean, expected[0])
    np.testing.assert_allclose(lower, expected[1], rtol=1e-9)
    np.testing.assert_allclose(upper, expected[2], rtol=1e-9)
    assert upper[-1] == 100.0 and expected[0][-1] + 1 < 100  # cut at 100 %, not min–max (99.9)

    fig = Figure()
    axes = fig.subplots(1, 2)
    report.draw_curves(axes, {"sgd": _runs(VALUES)}, ["test_acc", "train_loss"])
    (band,) = axes[0].collections  # the one filled band drawn
    y = band.get_paths()[0].vertices[:, 1]
    np.testing.assert_allclose(sorted(set(np.round(y, 9))), sorted(set(np.round([*expected[1], *expected[2]], 9))))


def test_one_run_draws_no_band() -> None:
    fig = Figure()
    axes = fig.subplots(1, 2)
    report.draw_curves(axes, {"sam": _runs(VALUES[:1])}, ["test_acc", "train_loss"])
    assert not axes[0].collections and axes[0].lines[0].get_label() == "sam (1 run)"


def test_accuracy_error_bars_stay_within_0_and_100() -> None:
    below, above = clip_interval([98.0, 50.0, 3.0, 70.0], [5.0, 5.0, 5.0, math.nan])
    np.testing.assert_allclose(below, [5.0, 5.0, 3.0, 0.0])
    np.testing.assert_allclose(above, [2.0, 5.0, 5.0, 0.0])
    fig = Figure()
    ax = fig.subplots()
    container = accuracy_errorbar(ax, [1, 2], [98.0, 1.0], [5.0, 4.0])
    segments = np.concatenate([s for collection in container.lines[2] for s in collection.get_segments()])
    assert segments[:, 1].max() == 100.0 and segments[:, 1].min() == 0.0


def test_epoch_axes_have_integer_ticks() -> None:
    fig = Figure()
    axes = fig.subplots(1, 2)
    report.draw_curves(axes, {"sgd": _runs(VALUES)}, ["test_acc", "train_loss"])
    fig.canvas.draw()
    for ax in axes:
        ticks = ax.get_xticks()
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
    ax = Figure().subplots()
    ax.plot([1, 2, 3, 4, 5], [1, 2, 3, 4, 5])
    integer_ticks(ax, "both")
    assert all(float(t).is_integer() for t in [*ax.get_xticks(), *ax.get_yticks()])


def test_the_eigenvalue_index_of_the_spectrum_figure_has_integer_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    from sharpness.reproductions import sam

    kept = _captured(monkeypatch, sam)
    spectrum = {"SGD": {"eigenvalues_mean": [9.0, 5.0, 3.1, 2.5, 2.2]}, "SAM": {"eigenvalues_mean": [4, 3, 2.9, 2.3]}}
    sam._spectrum_figure(Path("unused.png"), spectrum)
    (ax,) = kept[0].axes
    assert all(float(t).is_integer() for t in ax.get_xticks())
    labels = _visible_labels(ax.yaxis)  # a log axis from 2.2 to 9: plain numbers
    assert labels and all("10^" not in label and "\\times" not in label for label in labels), labels
    assert {"3", "5"} <= set(labels)


@pytest.mark.parametrize(
    "low, high, shown",
    [(2.2, 4.5, {"3", "4"}), (0.3, 10.0, {"0.5", "1", "2", "5", "10"}), (1e-8, 1.0, {"$10^{-6}$", "0.01", "1"})],
)
def test_log_axes_get_plain_labels(tmp_path: Path, low: float, high: float, shown: set[str]) -> None:
    fig, ax = figures.panels()
    ax.plot([low, high], [low, high])
    ax.set(xscale="log", yscale="log", xlim=(low, high), ylim=(low, high))
    save_figure(fig, tmp_path / "log.png")  # puts the formatter on every log axis
    for axis in (ax.xaxis, ax.yaxis):
        labels = [label.replace("−", "-") for label in _visible_labels(axis)]
        assert shown <= set(labels), labels
        assert not any("\\times" in label or "×" in label for label in labels)
    assert (tmp_path / "log.png").is_file()


def test_plain_number() -> None:
    assert [plain_number(x) for x in (2.0, 0.5, 30000.0, 0.001, 1e-6, 2e-6, 1e6)] == [
        "2",
        "0.5",
        "30000",
        "0.001",
        "$10^{-6}$",
        "$2\\cdot10^{-6}$",
        "$10^{6}$",
    ]


def test_optimizer_colours_are_fixed_and_names_resolve() -> None:
    assert optimizer_colour("sam") == optimizer_colour("SAM") == optimizer_colour("sam ρ=0.05") == "#d62728"
    assert optimizer_colour("AE-SAM") == OPTIMIZER_COLOURS["aesam"]
    assert optimizer_colour("GD") == optimizer_colour("sgd") == "#1f77b4"
    assert optimizer_colour("m-SAM m=8") == OPTIMIZER_COLOURS["m-sam"] != OPTIMIZER_COLOURS["msam"]
    unknown = optimizer_colour("brand-new-optimizer")
    assert unknown == optimizer_colour("brand-new-optimizer") and unknown not in OPTIMIZER_COLOURS.values()
    assert len(set(OPTIMIZER_COLOURS.values())) == len(OPTIMIZER_COLOURS)


def test_an_optimizer_has_the_same_colour_in_different_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    from sharpness.reproductions import efficient, sam

    fig = Figure()
    axes = fig.subplots(1, 2)
    report.draw_curves(axes, {"sgd": _runs(VALUES), "sam ρ=0.05": _runs(VALUES)}, ["test_acc", "train_loss"])
    curves = {line.get_label().split(" ")[0]: to_hex(line.get_color()) for line in axes[0].lines}

    kept = _captured(monkeypatch, sam)
    stat = {"mean": 0.9, "ci95": 0.01}
    sam._noise_figure(Path("x.png"), sam.QUICK, {f"{n} noise={v:g}": stat for n in ("SGD", "SAM") for v in (0, 0.4)})
    noise = {c.get_label(): to_hex(c.lines[0].get_color()) for c in kept[0].axes[0].containers}

    kept = _captured(monkeypatch, efficient)
    row = {"test_acc_mean": 0.9, "test_acc_ci95": 0.2, "passes_per_step": 1.0, "cpu_vs_sgd": 1.0}
    efficient._accuracy_figure(Path("y.png"), {"sgd": row, "sam": row}, "t")
    frontier = {c.get_label(): to_hex(c.lines[0].get_color()) for c in kept[0].axes[0].containers}

    assert curves["sgd"] == noise["SGD"] == frontier["SGD"] == OPTIMIZER_COLOURS["sgd"]
    assert curves["sam"] == noise["SAM"] == frontier["SAM"] == OPTIMIZER_COLOURS["sam"]
    (band,) = kept[0].axes[0].patches  # SAM's 95% CI, 90 ± 20 %, cut at 100 %
    assert (band.get_y(), band.get_y() + band.get_height()) == pytest.approx((70.0, 100.0))
    bars = [s for c in kept[0].axes[0].containers for lines in c.lines[2] for s in lines.get_segments()]
    assert max(segment[:, 1].max() for segment in bars) == pytest.approx(100.0)


def test_the_sharpness_figure_marks_an_infinite_edge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [
        {"step": 2, "lambda_max": 3.0, "edge": 20.0, "edge_kind": "gd", "lambda_over_edge": 0.15},
        {"step": 4, "lambda_max": 4.0, "edge": 40.0, "edge_kind": "gd", "lambda_over_edge": 0.1},
        {"step": 6, "lambda_max": 4.5, "edge": 4e6, "edge_kind": "gd", "lambda_over_edge": 1e-6},
        {"step": 8, "lambda_max": 4.5, "edge": None, "edge_kind": "gd", "lambda_over_edge": 0.0},  # lr = 0
    ]
    file = tmp_path / "sharpness.jsonl"
    file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    kept = _captured(monkeypatch, report)
    assert report._sharpness_figure({"sgd": file}, tmp_path / "s.png", "t")
    (ax,) = kept[0].axes
    edge = next(line for line in ax.lines if line.get_label() == "sgd: edge (gd)")
    assert math.isnan(edge.get_ydata()[-1])  # the curve stops where the edge is infinite
    (marker,) = [line for line in ax.lines if line.get_marker() == "^"]
    assert list(marker.get_xdata()) == [8] and marker.get_label() == "sgd: edge = ∞ (learning rate 0)"
    assert ax.get_ylim()[1] < 1e3  # the 4e6 edge just before lr = 0 leaves the panel instead of squashing it
    assert to_hex(ax.lines[0].get_color()) == OPTIMIZER_COLOURS["sgd"]


def test_the_style_applies_to_the_packages_figures_and_leaves_the_callers_settings_alone() -> None:
    import importlib

    import matplotlib

    for module in ("sharpness.reproductions.sam", "sharpness.reproductions.efficient", "sharpness.experiments.measure"):
        importlib.import_module(module)
    with matplotlib.rc_context({"font.size": 13.0, "legend.fontsize": 13.0}):
        plt = figures.pyplot()

        @figures.styled
        def draw() -> tuple[float, float, float]:
            fig, ax = figures.panels()
            ax.plot([1, 2], [1, 2], label="sgd")
            sizes = ax.xaxis.label.get_size(), ax.legend().get_texts()[0].get_fontsize(), fig.get_figwidth()
            plt.close(fig)
            return sizes

        assert draw() == (figures.STYLE["axes.labelsize"], figures.STYLE["legend.fontsize"], figures.PANEL[0])
        assert matplotlib.rcParams["font.size"] == 13.0  # the caller's setting, untouched by import or drawing


def test_every_function_that_saves_a_figure_draws_in_the_style() -> None:
    import ast

    package = Path(figures.__file__).parents[1]
    unstyled = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name != "save_figure":
                calls = {c.func.id for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
                decorators = {d.id for d in node.decorator_list if isinstance(d, ast.Name)}
                if "save_figure" in calls and "styled" not in decorators:
                    unstyled.append(f"{path.relative_to(package)}:{node.name}")
    assert not unstyled, f"figure functions without @styled: {unstyled}"
