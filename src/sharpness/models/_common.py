"""Argument checking shared by the built-in models (internal).

Every model validates its own constructor arguments, so a model built directly (``MLP(...)``) is as safe as one
built through :func:`sharpness.models.build_model`. Invalid values raise ``ValueError`` with the expected form.
Integer, float and boolean options also accept their string spelling (``"64"``, ``"0.3"``, ``"true"``), so a
command line can pass option values through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from sharpness.checks import check_bool, check_integer, check_real, is_integer

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def check_shape(input_shape: object, *, model: str, lengths: tuple[int, ...], expected: str) -> tuple[int, ...]:
    """Return ``input_shape`` as a tuple of positive ints if it has one of the allowed ``lengths``."""
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise ValueError(f"{model}: input_shape must be {expected}, got {input_shape!r}")
    shape = tuple(input_shape)
    if len(shape) not in lengths or not all(is_integer(d) and d >= 1 for d in shape):
        raise ValueError(f"{model}: input_shape must be {expected} (positive integers), got {input_shape!r}")
    return tuple(int(d) for d in shape)


def from_text(value: Any, kind: Callable[[str], Any]) -> Any:
    """``kind(value)`` if ``value`` is a string that ``kind`` (``int``, ``float``) parses, else ``value`` itself."""
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            pass
    return value


def as_int(value: object, name: str, *, model: str, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (an int, or a string spelling one)."""
    return check_integer(from_text(value, int), name, owner=model, low=minimum)


def as_int_tuple(value: object, name: str, *, model: str, allow_empty: bool) -> tuple[int, ...]:
    """A tuple of positive ints, from an int, a sequence of ints, or a comma-separated string ``"256,256"``."""
    items: Sequence[object]
    if isinstance(value, str):
        text = value.strip()
        items = [] if text == "" else [part.strip() for part in text.split(",")]
    elif is_integer(value):
        items = [value]
    elif isinstance(value, Sequence):
        items = list(value)
    else:
        raise ValueError(
            f"{model}: {name} must be a list of positive integers or a string like '256,256', got {value!r}"
        )
    try:
        result = tuple(as_int(item, name, model=model) for item in items)
    except ValueError:
        raise ValueError(
            f"{model}: {name} must be a list of positive integers or a string like '256,256', got {value!r}"
        ) from None
    if not result and not allow_empty:
        raise ValueError(f"{model}: {name} must not be empty")
    return result


def as_float(value: object, name: str, *, model: str, low: float, high: float) -> float:
    """A float with ``low <= value < high`` (a real number, or a string spelling one)."""
    return check_real(from_text(value, float), name, owner=model, low=low, high=high, high_open=True)


def as_bool(value: object, name: str, *, model: str) -> bool:
    """A bool (also the strings true/false, 1/0, yes/no, on/off)."""
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    return check_bool(value, name, owner=model, error=ValueError)


def init_resnet_(model: nn.Module, *, zero_linear_bias: bool) -> None:
    """The ResNet initialisation (He et al. 2015): Kaiming-normal convolutions (fan_out, ReLU gain), BatchNorm
    weight 1 and bias 0; linear layers keep PyTorch's default, except that ``zero_linear_bias`` zeroes their
    biases (as the WideResNet reference code does)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif zero_linear_bias and isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
