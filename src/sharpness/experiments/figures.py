"""One figure style for every figure of the package, and one way to finish and save a figure.

Matplotlib runs without a display (the Agg backend). Everything a reader compares across figures is set here:

- the size of a panel (:data:`PANEL`, inches) and font sizes relative to it (:data:`STYLE`, applied by :func:`styled`);
  :func:`panels` makes a grid of panels of that size;
- one colour per optimizer (:func:`optimizer_colour`), the same in every figure and report, with a deterministic
  colour for a name it does not know;
- integer ticks for axes that count (epochs, an eigenvalue's index: :func:`integer_ticks`);
- plain tick labels on logarithmic axes (``2``, ``0.5``, ``10⁻⁶``; never ``2.2×10⁰``): :class:`PlainLogFormatter`,
  put on every log axis by :func:`save_figure`;
- intervals of accuracies kept within [0, 100] % (:func:`clip_interval`, :func:`accuracy_errorbar`) and the band of
  a learning curve, mean ± the half-width of the 95% Student-t interval over seeds (:func:`ci_band`, the statistics
  of :mod:`sharpness.experiments.stats`, as in the tables).
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np

from sharpness.experiments.stats import mean_ci95

PANEL = (4.8, 3.6)
"""Width and height of one panel, inches: a figure of ``r × c`` panels is ``c · 4.8`` by ``r · 3.6`` inches."""
DPI = 110
STYLE = {
    "font.size": 9.0,
    "axes.titlesize": 9.5,
    "axes.labelsize": 9.0,
    "xtick.labelsize": 8.0,
    "ytick.labelsize": 8.0,
    "legend.fontsize": 7.5,
    "figure.titlesize": 10.5,
    "axes.grid": True,
    "axes.grid.which": "major",
    "grid.alpha": 0.3,
    "lines.linewidth": 1.3,
    "errorbar.capsize": 3.0,
    "savefig.dpi": DPI,
}
"""Font sizes fit a :data:`PANEL`-sized panel (a 9 pt text is 1/29 of its height); set by :func:`styled`."""

OPTIMIZER_COLOURS = {
    "sgd": "#1f77b4",  # blue; also plain gradient descent ("gd")
    "sam": "#d62728",  # red
    "m-sam": "#ff9896",  # light red: SAM with a perturbation per micro-batch of m examples
    "asam": "#8c564b",
    "aesam": "#2ca02c",
    "aelooksam": "#bcbd22",
    "looksam": "#ff7f0e",
    "randomsam": "#e377c2",
    "periodicsam": "#17becf",
    "msam": "#393b79",
    "latesam": "#8c6d31",
    "lateaesam": "#637939",
    "adam": "#9467bd",
}
"""The colour of each optimizer in every figure (hex RGB); :func:`optimizer_colour` reads it."""
P = ParamSpec("P")
R = TypeVar("R")
_ALIASES = {"gd": "sgd", "adamw": "adam", "msgd": "sgd"}
_FALLBACK = ("#7b4173", "#a55194", "#ce6dbd", "#843c39", "#ad494a", "#e7969c", "#5254a3", "#6b6ecf", "#3182bd",
             "#e6550d", "#31a354", "#756bb1")  # fmt: skip


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed; imported on first use). The style is not set
    here: :func:`styled` applies it to the package's own figures only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def styled(draw: Callable[P, R]) -> Callable[P, R]:
    """Decorate a function that draws and saves a figure: it runs with :data:`STYLE` in a ``matplotlib.rc_context``,
    so every figure of the package has the one style and a caller's own matplotlib settings are left alone."""

    @functools.wraps(draw)
    def in_style(*args: P.args, **kwargs: P.kwargs) -> R:
        with pyplot().rc_context(STYLE):
            return draw(*args, **kwargs)

    return in_style


def figure_size(rows: int = 1, cols: float = 1) -> tuple[float, float]:
    """The size in inches of ``rows × cols`` panels (``cols`` may be fractional: one wide panel)."""
    return PANEL[0] * cols, PANEL[1] * rows


def panels(rows: int = 1, cols: int = 1, **kwargs: Any) -> tuple[Any, Any]:
    """``plt.subplots(rows, cols)`` at :data:`PANEL` per panel (``kwargs`` as for ``subplots``, e.g. ``sharey``)."""
    kwargs.setdefault("figsize", figure_size(rows, cols))
    return pyplot().subplots(rows, cols, **kwargs)


def optimizer_key(name: str) -> str:
    """The key of :data:`OPTIMIZER_COLOURS` for a CLI name or a display label: ``"AE-SAM"`` → ``aesam``,
    ``"sam ρ=0.05"`` → ``sam``, ``"m-SAM m=8"`` → ``m-sam``, ``"GD"`` → ``sgd``."""
    word = name.strip().split(" ")[0].lower() if name.strip() else ""
    if word.startswith("m-sam"):
        return "m-sam"
    key = word.replace("-", "").replace("_", "")
    return _ALIASES.get(key, key)


def optimizer_colour(name: str) -> str:
    """The colour of optimizer ``name`` (see :func:`optimizer_key`); an unknown name gets a colour of its own
    from a fixed palette, chosen by a checksum of the name (the same in every run and process)."""
    key = optimizer_key(name)
    if key in OPTIMIZER_COLOURS:
        return OPTIMIZER_COLOURS[key]
    return _FALLBACK[zlib.crc32(key.encode()) % len(_FALLBACK)]


def shades(colour: str, n: int) -> list[tuple[float, float, float]]:
    """``n`` shades of ``colour`` from lighter to darker (several settings of one optimizer, e.g. SAM's ρ)."""
    from matplotlib.colors import to_rgb

    base = np.array(to_rgb(colour))
    mix = np.linspace(0.45, -0.35, n) if n > 1 else np.zeros(1)
    return [tuple(np.clip(base + m * (1 - base) if m > 0 else base * (1 + m), 0, 1)) for m in mix]


def integer_ticks(ax: Any, which: str = "x") -> None:
    """Ticks only at integers on ``ax``'s ``which`` axis (``"x"``, ``"y"`` or ``"both"``): epochs, indices."""
    from matplotlib.ticker import MaxNLocator

    for name in ("x", "y") if which == "both" else (which,):
        getattr(ax, f"{name}axis").set_major_locator(MaxNLocator(integer=True))


def plain_number(x: float) -> str:
    """A tick label without scientific notation where a plain number is short: ``2``, ``0.5``, ``30000``; powers of
    ten beyond [0.001, 100000) as ``10⁻⁶`` (mathtext), other such numbers as ``2·10⁻⁶``."""
    if x == 0 or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    if 1e-3 <= abs(x) < 1e5:
        return f"{x:.6g}"
    exponent = math.floor(math.log10(abs(x)) + 1e-9)
    coeff = x / 10**exponent
    power = f"10^{{{exponent}}}"
    return f"${power}$" if abs(coeff - 1) < 1e-6 else f"${coeff:.3g}\\cdot{power}$"


_SUBLABELS = ((1,), (1, 2, 5), (1, 2, 3, 5, 7), tuple(range(1, 11)))


@functools.cache
def log_formatter_class() -> type:
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        """Labels of a logarithmic axis as :func:`plain_number`, at the fewest ticks that label at least three
        places in view: the powers of 10; else 1, 2 and 5 times them; else 1, 2, 3, 5 and 7 times; else every tick
        (so a view of less than a decade is labelled too, with short labels that do not overlap). With another base,
        only its powers."""

        def set_locs(self, locs: Any = None) -> None:
            vmin, vmax = sorted(self.axis.get_view_interval())
            if vmin <= 0 or not math.isfinite(vmax) or self._base != 10:
                self._sublabels = {1}
                return
            powers = range(math.floor(math.log10(vmin)), math.floor(math.log10(vmax)) + 1)
            for subset in _SUBLABELS:
                if sum(vmin <= c * 10.0**p <= vmax for c in subset for p in powers) >= 3:
                    break
            self._sublabels = set(subset)

        def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
            return plain_number(x)

    return PlainLogFormatter


def readable_log_axis(ax: Any, which: str = "both") -> None:
    """Plain tick labels (:func:`plain_number`) on the log-scaled axes of ``ax`` among ``which``."""
    formatter = log_formatter_class()
    for name in ("x", "y") if which == "both" else (which,):
        axis = getattr(ax, f"{name}axis")
        if axis.get_scale() == "log":
            base = getattr(axis.get_transform(), "base", 10)
            axis.set_major_formatter(formatter(base=base))
            axis.set_minor_formatter(formatter(base=base))


def clip_interval(
    mean: Sequence[float] | float, half: Sequence[float] | float, low: float = 0.0, high: float = 100.0
) -> tuple[np.ndarray, np.ndarray]:
    """Error-bar lengths (below, above) of ``mean ± half`` cut to ``[low, high]`` (an accuracy in % by default);
    a NaN half-width (one seed: no interval) gives bars of length 0."""
    mean = np.atleast_1d(np.asarray(mean, dtype=float))
    half = np.nan_to_num(np.broadcast_to(np.asarray(half, dtype=float), mean.shape), nan=0.0)
    below = mean - np.maximum(mean - half, low)
    above = np.minimum(mean + half, high) - mean
    return np.maximum(below, 0.0), np.maximum(above, 0.0)


def accuracy_errorbar(ax: Any, x: Any, mean: Any, half: Any, **kwargs: Any) -> Any:
    """Accuracies in % with bars of the 95% CI (``mean ± half``), cut to [0, 100] (:func:`clip_interval`)."""
    below, above = clip_interval(mean, half)
    kwargs.setdefault("marker", "o")
    return ax.errorbar(x, mean, yerr=np.vstack([below, above]), **kwargs)


def ci_band(
    columns: Sequence[Sequence[float]], low: float = -math.inf, high: float = math.inf
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and 95% CI band (:func:`~sharpness.experiments.stats.mean_ci95`) of each column of values (one column
    per x: the seeds' values at one epoch): ``(mean, lower, upper)``, the band cut to ``[low, high]``; NaN where a
    column has one value (no interval) or a NaN value."""
    stats = [mean_ci95(list(column)) for column in columns]
    mean = np.array([m for m, _ in stats], dtype=float)
    half = np.array([h for _, h in stats], dtype=float)
    return mean, np.clip(mean - half, low, high), np.clip(mean + half, low, high)


def save_figure(fig: Any, path: Path, dpi: int = DPI) -> Path:
    """Plain labels on every log axis (:func:`readable_log_axis`), lay out, save (PNG) and close; returns ``path``."""
    for ax in fig.axes:
        readable_log_axis(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
