"""The counts' vocabulary (docs/curvature.md, "Counts"): every renamed argument, attribute and flag.

The old name gives bit for bit the result of the new one (same seed) and warns ``DeprecationWarning`` naming the
new one; both at once are a ``TypeError``; the old ``measure`` flags still parse, hidden, with a note on stderr.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from sharpness._deprecation import renamed_arguments
from sharpness.cli import RENAMED_MEASURE_FLAGS, build_parser
from sharpness.curvature import (
    frobenius_norm,
    hutchinson_trace,
    power_iteration,
    spectral_density,
    top_eigenvalues,
)
from sharpness.curvature.linop import DenseOperator
from sharpness.curvature.rho_sharpness import average_case_sharpness, m_sharpness
from sharpness.curvature.trace import hutchpp_trace
from sharpness.data import load_dataset
from sharpness.experiments.measure import measure
from sharpness.models import build_model
from sharpness.train import Trainer
from sharpness.train.tracking import SharpnessTracker

F = nn.functional


def _operator() -> DenseOperator:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(12, 12, generator=g, dtype=torch.float64)
    return DenseOperator((a + a.T) / 2)


def _net_and_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    g = torch.Generator().manual_seed(1)
    return (
        net,
        torch.randn(12, 3, generator=g, dtype=torch.float64),
        torch.randn(12, 1, generator=g, dtype=torch.float64),
    )


def _average(**count: int) -> Any:
    net, x, y = _net_and_data()
    return average_case_sharpness(net, F.mse_loss, (x, y), 0.1, generator=torch.Generator().manual_seed(2), **count)


def _m_average(**count: int) -> Any:
    net, x, y = _net_and_data()
    return m_sharpness(net, F.mse_loss, x, y, 4, 0.1, kind="average", **count)


def _seeded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(op, generator=seed 7, **count)`` on a fresh operator."""
    return lambda **count: fn(_operator(), generator=torch.Generator().manual_seed(7), **count)


#: (function name, call with the count as keyword arguments, old name, new name, a value)
RENAMED = [
    ("hutchinson_trace", _seeded(hutchinson_trace), "num_samples", "num_matvecs", 9),
    ("frobenius_norm", _seeded(frobenius_norm), "num_samples", "num_matvecs", 9),
    ("top_eigenvalues", _seeded(lambda op, **kw: top_eigenvalues(op, 3, tol=0.0, **kw)), "max_iter", "num_matvecs", 8),
    ("power_iteration", _seeded(lambda op, **kw: power_iteration(op, tol=0.0, **kw)), "max_iter", "num_matvecs", 5),
    ("spectral_density", _seeded(spectral_density), "num_vectors", "num_probes", 3),
    ("spectral_density", _seeded(spectral_density), "lanczos_steps", "num_matvecs_per_probe", 6),
    ("average_case_sharpness", _average, "num_samples", "num_probes", 5),
    ("m_sharpness", _m_average, "num_samples", "num_probes", 3),
]
IDS = [f"{name}-{old}" for name, _, old, _, _ in RENAMED]


def _same(a: Any, b: Any) -> bool:
    """Equal, bitwise for tensors and floats (NaN equal to NaN), recursively through dataclasses and sequences."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.nan_to_num(), b.nan_to_num())
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


@pytest.mark.parametrize(("name", "call", "old", "new", "value"), RENAMED, ids=IDS)
def test_old_name_gives_the_same_result_and_warns(name, call, old, new, value) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the new name: no warning at all
        expected = call(**{new: value})
    with pytest.warns(DeprecationWarning, match=rf"{name}'s argument {old} is deprecated.*; use {new}$") as record:
        got = call(**{old: value})
    assert len(record) == 1  # m_sharpness maps it once, not once per batch
    assert record[0].filename == __file__  # attributed to the caller
    assert _same(got, expected)


@pytest.mark.parametrize(("name", "call", "old", "new", "value"), RENAMED, ids=IDS)
def test_both_names_are_a_type_error(name, call, old, new, value) -> None:
    with pytest.raises(TypeError, match=rf"^{name}\(\) got both '{old}' and '{new}'; pass only '{new}'") as info:
        call(**{old: value, new: value})
    assert "\n" not in str(info.value)


#: every renamed argument of the public API: old → new (and m_sharpness's, passed on in its ``**kwargs``)
RENAMES = {
    hutchinson_trace: {"num_samples": "num_matvecs"},
    frobenius_norm: {"num_samples": "num_matvecs"},
    top_eigenvalues: {"max_iter": "num_matvecs"},
    power_iteration: {"max_iter": "num_matvecs"},
    spectral_density: {"num_vectors": "num_probes", "lanczos_steps": "num_matvecs_per_probe"},
    average_case_sharpness: {"num_samples": "num_probes"},
    SharpnessTracker: {"max_iter": "num_matvecs"},
    measure: {"samples": "trace_matvecs", "max_iter": "eig_matvecs", "density_vectors": "density_probes",
              "density_steps": "density_matvecs_per_probe", "sharpness_samples": "sharpness_probes"},
}  # fmt: skip


@pytest.mark.parametrize(("fn", "old", "new"), [(fn, old, new) for fn, r in RENAMES.items() for old, new in r.items()])
def test_signatures_show_the_new_names(fn, old, new) -> None:
    parameters = inspect.signature(fn).parameters
    assert new in parameters and old not in parameters
    assert old in inspect.getdoc(fn)  # the docstring names the alias


def test_positional_counts_keep_their_place() -> None:
    op = _operator()
    assert _same(hutchinson_trace(op, 9), hutchinson_trace(op, num_matvecs=9))
    assert _same(frobenius_norm(op, 9), frobenius_norm(op, num_matvecs=9))


@pytest.mark.parametrize(("estimator", "count"), [(hutchinson_trace, 9), (hutchpp_trace, 9), (frobenius_norm, 9)])
def test_result_num_samples_is_a_deprecated_alias_of_num_probes(estimator, count) -> None:
    est = estimator(_operator(), count)
    owner = type(est).__name__
    with pytest.warns(DeprecationWarning, match=rf"{owner}.num_samples is deprecated.*; use {owner}.num_probes$"):
        assert est.num_samples == est.num_probes
    assert "num_samples" not in {f.name for f in dataclasses.fields(est)}
    assert est.num_probes == (count if estimator is not hutchpp_trace else count - 2 * (count // 3))


def _trainer(tracker: SharpnessTracker) -> Trainer:
    data = load_dataset("synthetic", seed=0, n_train=32, n_test=8, dim=4)
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=data.input_shape, num_classes=data.num_classes, hidden=(6,))
    return Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), data, epochs=1, batch_size=16, callbacks=[tracker]
    )


def test_tracker_max_iter_is_a_deprecated_alias() -> None:
    new = SharpnessTracker(1, measure_size=32, num_matvecs=7)
    with pytest.warns(
        DeprecationWarning, match=r"SharpnessTracker's argument max_iter is deprecated.*; use num_matvecs$"
    ):
        old = SharpnessTracker(1, measure_size=32, max_iter=7)
    assert old.num_matvecs == new.num_matvecs == 7
    with pytest.warns(DeprecationWarning, match=r"SharpnessTracker.max_iter is deprecated.*; use SharpnessTracker"):
        assert old.max_iter == 7
    rows = [tracker.measure(_trainer(tracker), 0, 0) for tracker in (new, old)]
    assert rows[0] == rows[1] and rows[0]["matvecs"] <= 7
    with pytest.raises(TypeError, match="SharpnessTracker\\(\\) got both 'max_iter' and 'num_matvecs'"):
        SharpnessTracker(1, max_iter=7, num_matvecs=7)


@pytest.mark.parametrize(("old", "new"), RENAMED_MEASURE_FLAGS.items())
def test_old_measure_flags_parse_as_the_new_ones_with_a_note(old, new, capsys) -> None:
    parser = build_parser()
    dest = new.lstrip("-").replace("-", "_")
    assert getattr(parser.parse_args(["measure", "run", new, "7"]), dest) == 7
    assert capsys.readouterr().err == ""
    args = parser.parse_args(["measure", "run", old, "7"])
    assert getattr(args, dest) == 7 and old.lstrip("-").replace("-", "_") not in vars(args)
    assert vars(args) == vars(parser.parse_args(["measure", "run", new, "7"]))
    err = capsys.readouterr().err
    assert err == f"sharpness: {old} is deprecated and will be removed in the next release; use {new}\n"
    # hidden from --help, and the defaults (those of measure()) are untouched
    assert old not in parser._subparsers._group_actions[0].choices["measure"].format_help()
    assert getattr(parser.parse_args(["measure", "run"]), dest) == inspect.signature(measure).parameters[dest].default


def test_renamed_arguments_keeps_name_doc_and_signature() -> None:
    @renamed_arguments(old="new")
    def f(*, new: int = 1) -> int:
        """Doc."""
        return new

    assert f.__name__ == "f" and f.__doc__ == "Doc." and list(inspect.signature(f).parameters) == ["new"]
    assert f() == 1 and f(new=2) == 2
    with pytest.warns(DeprecationWarning, match="^f's argument old is deprecated"):
        assert f(old=3) == 3
