"""sharpness.checks, and the public functions that validate their arguments with it.

Every check accepts Python numbers and numpy scalars alike (returning plain Python ints and floats), rejects
bools as numbers, and raises one-line messages naming the owner, the argument, what is allowed and the value.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sharpness.checks import (
    check_bool,
    check_choice,
    check_integer,
    check_probability,
    check_real,
    is_integer,
    is_real,
)
from sharpness.curvature import (
    DenseOperator,
    alignment_factor,
    average_case_sharpness,
    frobenius_norm,
    gd_edge,
    hutchinson_trace,
    hutchpp_trace,
    m_sharpness,
    power_iteration,
    sam_edge,
    sam_edge_unnormalized,
    sgd_frobenius_bound,
    spectral_density,
    top_eigenvalues,
    worst_case_sharpness,
)
from sharpness.curvature.linop import CallableOperator
from sharpness.data import Augmentation, load_dataset, num_batches
from sharpness.experiments.config import ConfigError, RunConfig
from sharpness.models import build_model
from sharpness.optim import SAM, Adaptive, Bernoulli, EveryK, LookSAMReuse
from sharpness.train.tracking import SharpnessTracker

F = nn.functional
NUMPY_INTEGERS = (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)

# ---------------------------------------------------------------------------------------------- the module


@pytest.mark.parametrize("flag", [True, False, np.bool_(True), np.bool_(False)])
def test_bools_are_not_numbers(flag: object) -> None:
    assert not is_real(flag) and not is_integer(flag)
    with pytest.raises(ValueError, match="must be a finite number"):
        check_real(flag, "lr")
    with pytest.raises(ValueError, match="must be an integer"):
        check_integer(flag, "steps")
    with pytest.raises(ValueError, match=r"must be a number in \[0, 1\]"):
        check_probability(flag, "p")


@pytest.mark.parametrize("kind", NUMPY_INTEGERS)
def test_numpy_integers_are_integers_and_reals(kind: type) -> None:
    result = check_integer(kind(7), "n", low=1)
    assert result == 7 and type(result) is int
    real = check_real(kind(7), "x")
    assert real == 7.0 and type(real) is float
    assert is_integer(kind(7)) and is_real(kind(7))


@pytest.mark.parametrize("kind", [np.float16, np.float32, np.float64])
def test_numpy_floats_are_reals_but_not_integers(kind: type) -> None:
    result = check_real(kind(0.5), "x", low=0.0)
    assert result == 0.5 and type(result) is float
    assert check_probability(kind(0.25), "p") == 0.25
    assert is_real(kind(0.5)) and not is_integer(kind(2.0))
    with pytest.raises(ValueError, match="must be an integer"):
        check_integer(kind(2.0), "n")


@pytest.mark.parametrize("value", [2.0, "2", None, [2], 2 + 0j, torch.tensor(2)])
def test_non_integers_are_rejected(value: object) -> None:
    with pytest.raises(ValueError, match=r"^n must be an integer, got "):
        check_integer(value, "n")


@pytest.mark.parametrize("value", ["0.5", None, 1j, torch.tensor(0.5)])
def test_non_numbers_are_rejected(value: object) -> None:
    with pytest.raises(ValueError, match="x must be a finite number"):
        check_real(value, "x")


def test_nan_is_always_rejected_and_inf_only_on_request() -> None:
    for value in (math.nan, np.float32("nan")):
        with pytest.raises(ValueError, match=r"x must be a finite number, got .*nan"):
            check_real(value, "x")
        with pytest.raises(ValueError, match=r"x must be a number, got .*nan"):
            check_real(value, "x", allow_inf=True)
    with pytest.raises(ValueError, match="must be a finite number >= 0, got inf"):
        check_real(math.inf, "x", low=0.0)
    assert check_real(math.inf, "x", low=0.0, allow_inf=True) == math.inf
    assert check_real(np.float64("-inf"), "x", allow_inf=True) == -math.inf
    with pytest.raises(ValueError, match=r"must be a number in \[0, 1\]"):
        check_real(math.inf, "x", low=0.0, high=1.0, allow_inf=True)


def test_bounds_open_and_closed() -> None:
    assert check_real(0, "x", low=0.0) == 0.0
    assert check_real(1, "x", low=0.0, high=1.0) == 1.0
    with pytest.raises(ValueError, match=r"x must be a finite number > 0, got 0"):
        check_real(0, "x", low=0.0, low_open=True)
    with pytest.raises(ValueError, match=r"x must be a number in \[0, 1\), got 1"):
        check_real(1, "x", low=0.0, high=1.0, high_open=True)
    with pytest.raises(ValueError, match=r"x must be a number in \(0, 1\], got 0.0"):
        check_real(0.0, "x", low=0.0, high=1.0, low_open=True)
    with pytest.raises(ValueError, match=r"x must be a finite number < 2, got 2"):
        check_real(2, "x", high=2.0, high_open=True)
    assert check_integer(5, "k", low=1, high=5) == 5
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 5\], got 6"):
        check_integer(6, "k", low=1, high=5)
    with pytest.raises(ValueError, match=r"k must be an integer <= 5, got 6"):
        check_integer(6, "k", high=5)


def test_messages_name_owner_argument_range_purpose_and_value() -> None:
    with pytest.raises(ValueError) as info:
        check_real(-1.0, "rho", owner="SAM", low=0.0, what="the perturbation radius")
    assert str(info.value) == "SAM: rho must be a finite number >= 0 (the perturbation radius), got -1.0"
    with pytest.raises(ValueError) as info:
        check_integer(np.int64(0), "k", owner="top_eigenvalues", low=1, high=4, what="at most n")
    assert str(info.value) == "top_eigenvalues: k must be an integer in [1, 4] (at most n), got np.int64(0)"
    with pytest.raises(ValueError) as info:
        check_probability(1.5, "sam_prob")
    assert str(info.value) == "sam_prob must be a number in [0, 1], got 1.5"
    with pytest.raises(ValueError) as info:
        check_choice("lion", "optimizer", ("sgd", "sam"))
    assert str(info.value) == "unknown optimizer 'lion'; valid: sgd, sam"
    with pytest.raises(ValueError) as info:
        check_choice(3, "p", (2, math.inf))
    assert str(info.value) == "unknown p 3; valid: 2, inf"


def test_error_type_is_the_callers_choice() -> None:
    class Custom(ValueError):
        pass

    with pytest.raises(Custom, match="epochs must be an integer >= 1"):
        check_integer(0, "epochs", low=1, error=Custom)
    with pytest.raises(Custom):
        check_real("x", "lr", error=Custom)
    with pytest.raises(Custom):
        check_choice([1], "dataset", ("a",), error=Custom)  # unhashable: still the chosen error
    with pytest.raises(TypeError, match="flip must be True or False, got 1"):
        check_bool(1, "flip")
    with pytest.raises(Custom):
        check_bool("yes", "flip", error=Custom)


def test_check_bool_and_check_choice_accept_what_they_should() -> None:
    assert check_bool(np.bool_(True), "flip") is True and check_bool(False, "flip") is False
    assert check_choice("sam", "optimizer", ["sgd", "sam"]) == "sam"
    assert check_choice(np.float64(2.0), "p", (2, math.inf)) == 2


@given(
    value=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    low=st.integers(-5, 5),
    kind=st.sampled_from([int, np.int64]),
)
def test_check_integer_accepts_exactly_the_integers_in_range(value: int, low: int, kind: type) -> None:
    if value >= low:
        result = check_integer(kind(value), "n", low=low)
        assert result == value and type(result) is int
    else:
        with pytest.raises(ValueError, match=f"n must be an integer >= {low}, got"):
            check_integer(kind(value), "n", low=low)


@given(
    value=st.floats(allow_nan=True, allow_infinity=True, width=32),
    low=st.floats(-10, 10, width=32),
    span=st.floats(0, 10, width=32),
    low_open=st.booleans(),
    high_open=st.booleans(),
    kind=st.sampled_from([float, np.float32, np.float64]),
)
def test_check_real_accepts_exactly_the_finite_numbers_in_the_interval(
    value: float, low: float, span: float, low_open: bool, high_open: bool, kind: type
) -> None:
    high = low + span
    inside = math.isfinite(value) and (value > low if low_open else value >= low)
    inside = inside and (value < high if high_open else value <= high)
    scalar = kind(value)
    if inside:
        result = check_real(scalar, "x", low=low, high=high, low_open=low_open, high_open=high_open)
        assert result == value and type(result) is float
    else:
        with pytest.raises(ValueError) as info:
            check_real(scalar, "x", low=low, high=high, low_open=low_open, high_open=high_open)
        message = str(info.value)
        assert message.startswith(("x must be a finite number", "x must be a number in")) and "\n" not in message
        assert message.endswith(f"got {scalar!r}")


# ---------------------------------------------------------------------------------------------- the callers


class Python:
    """Scalars as plain Python values."""

    i, f, b = int, float, bool


class Numpy:
    """The same scalars as numpy scalars (dyadic float values, so float32 is exact)."""

    i, f, b = np.int64, np.float32, np.bool_


class Bools:
    """``True`` where a number is expected (every call must then raise ValueError)."""

    @staticmethod
    def i(value: int) -> bool:
        return True

    f = i
    b = bool


def _operator() -> DenseOperator:
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    eigenvalues = torch.linspace(-1.0, 4.0, 12, dtype=torch.float64)
    return DenseOperator((q * eigenvalues) @ q.T)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, generator=gen, dtype=torch.float64), torch.randn(8, 2, generator=gen, dtype=torch.float64)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _dataset(s: Any):
    return load_dataset(
        "synthetic",
        seed=s.i(3),
        val_split=s.f(0.25),
        label_noise=s.f(0.125),
        augment=s.b(False),
        n_train=s.i(16),
        n_test=s.i(8),
        dim=s.i(4),
        hidden=s.i(3),
        noise=s.f(0.125),
        data_seed=s.i(5),
    )


def _alignment(s: Any) -> float:
    gen = torch.Generator().manual_seed(2)
    jac = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    return alignment_factor(jac @ jac.T, torch.randn(6, generator=gen, dtype=torch.float64), s.i(3))


CALLS: dict[str, Callable[[Any], Any]] = {
    "top_eigenvalues": lambda s: top_eigenvalues(
        _operator(), s.i(2), num_matvecs=s.i(12), tol=s.f(2**-30), check_every=s.i(2)
    ),
    "power_iteration": lambda s: power_iteration(_operator(), num_matvecs=s.i(20), tol=s.f(2**-20)),
    "hutchinson_trace": lambda s: hutchinson_trace(_operator(), s.i(4)),
    "hutchpp_trace": lambda s: hutchpp_trace(_operator(), s.i(9)),
    "frobenius_norm": lambda s: frobenius_norm(_operator(), s.i(4)),
    "spectral_density": lambda s: spectral_density(
        _operator(), num_probes=s.i(2), num_matvecs_per_probe=s.i(6), grid=s.i(64), sigma=s.f(0.25)
    ),
    "CallableOperator": lambda s: CallableOperator(lambda v: 2 * v, s.i(5)).dim,
    "gd_edge": lambda s: gd_edge(s.f(0.5)),
    "sam_edge": lambda s: sam_edge(s.f(0.5), s.f(0.25), s.f(2.0)),
    "sam_edge_unnormalized": lambda s: sam_edge_unnormalized(s.f(0.5), s.f(0.25)),
    "sgd_frobenius_bound": lambda s: sgd_frobenius_bound(s.f(0.5), s.i(16), s.f(0.25)),
    "alignment_factor": _alignment,
    "worst_case_sharpness": lambda s: worst_case_sharpness(
        _net(), F.mse_loss, _batch(), s.f(0.125), adaptive=True, eta=s.f(0.5), steps=s.i(3), step_size=s.f(0.25)
    ),
    "average_case_sharpness": lambda s: average_case_sharpness(
        _net(), F.mse_loss, _batch(), s.f(0.125), num_probes=s.i(3), eta=s.f(0.0)
    ),
    "m_sharpness": lambda s: m_sharpness(_net(), F.mse_loss, *_batch(), s.i(4), s.f(0.125), steps=s.i(2)),
    "SharpnessTracker": lambda s: vars(SharpnessTracker(s.i(5), measure_size=s.i(64))),
    "num_batches": lambda s: num_batches(s.i(10), s.i(4)),
    "Augmentation": lambda s: Augmentation(crop_padding=s.i(2), flip=s.b(True), cutout=s.i(1)),
    "load_dataset": _dataset,
    "build_model": lambda s: (
        build_model("mlp", input_shape=(s.i(6),), num_classes=s.i(3), hidden=(s.i(4),), bias=s.b(False)).hidden
    ),
    "EveryK": lambda s: vars(EveryK(s.i(3), offset=s.i(1))),
    "Bernoulli": lambda s: Bernoulli(s.f(0.25), seed=s.i(2)).p,
    "Adaptive": lambda s: vars(Adaptive(delta=s.f(0.5), lambda1=s.f(-1.0), lambda2=s.f(1.0), total_steps=s.i(10))),
    "LookSAMReuse": lambda s: LookSAMReuse(alpha=s.f(0.5)).alpha,
    "SAM": lambda s: {
        key: value
        for key, value in SAM(_net().parameters(), torch.optim.SGD, rho=s.f(0.125), p=s.f(3.0), eta=s.f(0.25), lr=0.1)
        .param_groups[0]
        .items()
        if key.startswith("sam_")
    },
    "RunConfig": lambda s: isinstance(
        RunConfig(epochs=s.i(2), lr=s.f(0.5), rho=s.f(0.125), threads=s.i(1)).validate(), RunConfig
    ),
}


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same types (tensors bitwise, NaN equal to NaN), recursively."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.nan_to_num(), b.nan_to_num())
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("name", list(CALLS))
def test_numpy_scalars_give_the_same_result_as_python_scalars(name: str) -> None:
    assert _same(CALLS[name](Numpy), CALLS[name](Python))


@pytest.mark.parametrize("name", list(CALLS))
def test_bools_are_rejected_where_numbers_are_expected(name: str) -> None:
    error = ConfigError if name == "RunConfig" else ValueError
    with pytest.raises(error, match="must be"):
        CALLS[name](Bools)
