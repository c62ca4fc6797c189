"""Model names, option checking and :func:`build_model`.

Names (case-insensitive): ``mlp``, ``cnn1d``, ``cnn``, ``resnet18``, ``wrn`` and ``wrn-D-K`` (a WideResNet of depth
``D`` and widen factor ``K``, e.g. ``wrn-28-10``, ``wrn-16-4``). Plain ``wrn`` is WRN-16-4 (2.75M parameters for
10 classes, CPU-friendly) unless ``depth`` / ``widen_factor`` options say otherwise; ask for ``wrn-28-10`` for
the large model of the SAM paper.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from sharpness.models.cnn import CNN
from sharpness.models.cnn1d import CNN1D
from sharpness.models.mlp import MLP
from sharpness.models.resnet18 import ResNet18
from sharpness.models.wide_resnet import WideResNet, check_depth

__all__ = ["MODELS", "build_model", "count_parameters", "model_options", "parse_model_name"]

MODELS: tuple[str, ...] = ("mlp", "cnn1d", "cnn", "resnet18", "wrn")
"""The valid model names; ``wrn`` also has the ``wrn-D-K`` spelling (e.g. ``wrn-28-10``)."""

_BUILDERS: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...]]] = {
    "mlp": (MLP, ("hidden", "activation", "bias")),
    "cnn1d": (CNN1D, ("channels",)),
    "cnn": (CNN, ("channels", "batchnorm")),
    "resnet18": (ResNet18, ("width",)),
    "wrn": (WideResNet, ("depth", "widen_factor", "dropout")),
}

_WRN_DEFAULTS = {"depth": 16, "widen_factor": 4}
_WRN_NAME = re.compile(r"wrn-(\d+)-(\d+)")


def _valid_names() -> str:
    return ", ".join(MODELS) + ", wrn-D-K (e.g. wrn-28-10, wrn-16-4)"


def parse_model_name(name: str) -> tuple[str, dict[str, int]]:
    """Split a model name into its registry key and the options its spelling implies.

    ``"WRN-28-10"`` gives ``("wrn", {"depth": 28, "widen_factor": 10})``; ``"wrn"`` gives
    ``("wrn", {"depth": 16, "widen_factor": 4})``; other names give ``(name.lower(), {})``.

    Raises:
        TypeError: if ``name`` is not a string.
        ValueError: for an unknown name (the message lists the valid ones) or an invalid WRN depth.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key in _BUILDERS:
        return key, (dict(_WRN_DEFAULTS) if key == "wrn" else {})
    match = _WRN_NAME.fullmatch(key)
    if match is not None:
        depth, widen_factor = int(match.group(1)), int(match.group(2))
        check_depth(depth, model=f"model name {name!r}")
        if widen_factor < 1:
            raise ValueError(f"model name {name!r}: the widen factor K of wrn-D-K must be >= 1")
        return "wrn", {"depth": depth, "widen_factor": widen_factor}
    hint = " (a WideResNet is named wrn-D-K, e.g. wrn-28-10)" if key.startswith("wrn") else ""
    raise ValueError(f"unknown model {name!r}{hint}; valid names: {_valid_names()}")


def model_options(name: str) -> tuple[str, ...]:
    """The option names that :func:`build_model` accepts for model ``name``."""
    return _BUILDERS[parse_model_name(name)[0]][1]


def build_model(name: str, *, input_shape: tuple[int, ...], num_classes: int, **options: object) -> nn.Module:
    """Build one of the built-in models.

    Args:
        name: model name, case-insensitive: one of :data:`MODELS`, or ``wrn-D-K`` (e.g. ``wrn-28-10``). Plain
            ``wrn`` is WRN-16-4.
        input_shape: shape of one example, without the batch dimension: ``(L,)`` or ``(C, L)`` for ``cnn1d``;
            ``(C, H, W)`` for ``cnn``, ``resnet18`` and ``wrn``; anything for ``mlp`` (it flattens).
        num_classes: number of outputs (logits).
        **options: model options: ``mlp``: ``hidden``, ``activation``, ``bias``; ``cnn1d``: ``channels``;
            ``cnn``: ``channels``, ``batchnorm``; ``resnet18``: ``width``; ``wrn``: ``depth``, ``widen_factor``,
            ``dropout``. Values may also be given as strings (``"256,256"``, ``"0.3"``, ``"true"``).

    The parameters are initialised from PyTorch's global random generator, so ``torch.manual_seed(s)`` before
    the call makes the weights reproducible.

    Raises:
        ValueError: for an unknown name, an invalid option value, an invalid ``input_shape`` for the model, or a
            ``wrn-D-K`` name together with a different ``depth`` / ``widen_factor`` option.
        TypeError: for an option the model does not accept.
    """
    key, implied = parse_model_name(name)
    builder, accepted = _BUILDERS[key]
    unknown = [option for option in options if option not in accepted]
    if unknown:
        raise TypeError(
            f"model {name!r} does not accept option(s) {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(accepted)}"
        )
    if key == "wrn" and name.strip().lower() != "wrn":
        for option, value in implied.items():
            if option in options and options[option] != value and str(options[option]).strip() != str(value):
                raise ValueError(
                    f"model {name!r} fixes {option}={value}, but the option {option}={options[option]!r} was also "
                    "given; use plain 'wrn' with options, or the wrn-D-K name alone"
                )
    kwargs = {**implied, **options} if key == "wrn" else dict(options)
    return builder(input_shape, num_classes, **kwargs)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``model`` (shared parameters counted once).

    With ``trainable_only=True``, only parameters with ``requires_grad`` are counted.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
