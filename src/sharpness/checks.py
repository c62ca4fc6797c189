"""Argument checks shared by every layer: one place, one vocabulary, one message format.

Every check accepts what a user may reasonably pass (Python numbers and numpy scalars: any ``numbers.Real`` or
``numbers.Integral``), rejects ``bool`` (``True`` is an ``int`` to Python, but never a learning rate or a count),
returns the value converted to a plain Python ``float`` / ``int``, and raises a one-line error that names the
owner, the argument, what is allowed and the value received::

    check_real(rho, "rho", owner="SAM", low=0.0, what="the perturbation radius")
    # ValueError: SAM: rho must be a finite number >= 0 (the perturbation radius), got -1.0

The exception type is ``ValueError`` unless the caller passes ``error=`` (the CLI's ``ConfigError`` does).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

__all__ = ["check_bool", "check_choice", "check_integer", "check_probability", "check_real", "is_integer", "is_real"]


def is_real(value: Any) -> bool:
    """A real number that is not a bool (numpy floating and integer scalars included)."""
    return isinstance(value, numbers.Real) and not _is_bool(value)


def is_integer(value: Any) -> bool:
    """An integer that is not a bool (numpy integer scalars included)."""
    return isinstance(value, numbers.Integral) and not _is_bool(value)


def _is_bool(value: Any) -> bool:
    # numpy's bool scalar (named bool_ before numpy 2, bool since) without importing numpy
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))


def _prefix(owner: str) -> str:
    return f"{owner}: " if owner else ""


def _suffix(what: str) -> str:
    return f" ({what})" if what else ""


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if math.isinf(high) and high > 0:
        return f"{'>' if low_open else '>='} {low:g}" if low > -math.inf else ""
    if math.isinf(low) and low < 0:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_real(
    value: Any,
    name: str,
    *,
    owner: str = "",
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
    what: str = "",
    error: type[Exception] = ValueError,
) -> float:
    """``value`` as a float if it is a real number within the bounds (finite unless ``allow_inf``), else ``error``.

    NaN is always rejected. With ``allow_inf=True`` the bound ``high`` may be ``math.inf`` and reached.
    """
    ok = is_real(value) and not math.isnan(value) and (allow_inf or math.isfinite(value))
    if ok:
        number = float(value)
        ok = (number > low if low_open else number >= low) and (number < high if high_open else number <= high)
        if ok:
            return number
    bounded = math.isfinite(low) and math.isfinite(high)
    kind = "a number" if allow_inf or bounded else "a finite number"
    bounds = _interval(low, high, low_open, high_open)
    raise error(f"{_prefix(owner)}{name} must be {kind}{' ' + bounds if bounds else ''}{_suffix(what)}, got {value!r}")


def check_integer(
    value: Any,
    name: str,
    *,
    owner: str = "",
    low: int | None = None,
    high: int | None = None,
    what: str = "",
    error: type[Exception] = ValueError,
) -> int:
    """``value`` as an int if it is an integer (not a bool, not a float) within ``[low, high]``, else ``error``."""
    if is_integer(value) and (low is None or value >= low) and (high is None or value <= high):
        return int(value)
    if low is not None and high is not None:
        bounds = f" in [{low}, {high}]"
    elif low is not None:
        bounds = f" >= {low}"
    elif high is not None:
        bounds = f" <= {high}"
    else:
        bounds = ""
    raise error(f"{_prefix(owner)}{name} must be an integer{bounds}{_suffix(what)}, got {value!r}")


def check_probability(
    value: Any, name: str, *, owner: str = "", what: str = "", error: type[Exception] = ValueError
) -> float:
    """``value`` as a float in ``[0, 1]``."""
    return check_real(value, name, owner=owner, low=0.0, high=1.0, what=what, error=error)


def check_bool(value: Any, name: str, *, owner: str = "", what: str = "", error: type[Exception] = TypeError) -> bool:
    """``value`` if it is ``True`` or ``False`` (numpy's ``bool_`` included, returned as a Python bool)."""
    if _is_bool(value):
        return bool(value)
    raise error(f"{_prefix(owner)}{name} must be True or False{_suffix(what)}, got {value!r}")


def check_choice(
    value: Any,
    name: str,
    choices: Iterable[Any],
    *,
    owner: str = "",
    error: type[Exception] = ValueError,
) -> Any:
    """``value`` if it is one of ``choices``; the error lists them."""
    choices = tuple(choices)
    try:
        if value in choices:
            return value
    except TypeError:  # unhashable or incomparable value
        pass
    valid = ", ".join(map(repr if not all(isinstance(c, str) for c in choices) else str, choices))
    raise error(f"{_prefix(owner)}unknown {name} {value!r}; valid: {valid}")
