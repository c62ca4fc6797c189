"""Model names, option checking and :func:`build_model`.

Names (case-insensitive): ``mlp``, ``cnn1d``, ``cnn``, ``resnet18``, ``wrn`` and ``wrn-D-K`` (a WideResNet of depth
``D`` and widen factor ``K``, e.g. ``wrn-28-10``, ``wrn-16-4``). Plain ``wrn`` is WRN-16-4 (2.75M parameters for
10 classes, CPU-friendly) unless ``depth`` / ``widen_factor`` options say otherwise; ask for ``wrn-28-10`` for
the large model of the SAM paper. ``cnn1d-bn`` and ``cnn1d-ln`` are ``cnn1d`` with ``norm="batch"`` / ``"layer"``.

Normalisation layers (what SAM-ON's ``--perturb norm`` perturbs): ``cnn`` (``BatchNorm2d``, unless
``batchnorm=False``), ``resnet18`` and ``wrn`` (``BatchNorm2d``), ``cnn1d-bn`` (``BatchNorm1d``) and ``cnn1d-ln``
(``GroupNorm(1, C)``); ``mlp`` and plain ``cnn1d`` have none (:data:`NORMALISED_MODELS`, :func:`has_normalisation`).
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

__all__ = [
    "MODELS",
    "NORMALISED_MODELS",
    "build_model",
    "count_parameters",
    "has_normalisation",
    "model_options",
    "parse_model_name",
]

MODELS: tuple[str, ...] = ("mlp", "cnn1d", "cnn", "resnet18", "wrn")
"""The valid model names; ``wrn`` also has the ``wrn-D-K`` spelling (e.g. ``wrn-28-10``)."""

_BUILDERS: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...]]] = {
    "mlp": (MLP, ("hidden", "activation", "bias")),
    "cnn1d": (CNN1D, ("channels", "norm")),
    "cnn": (CNN, ("channels", "batchnorm")),
    "resnet18": (ResNet18, ("width",)),
    "wrn": (WideResNet, ("depth", "widen_factor", "dropout")),
}

_WRN_DEFAULTS = {"depth": 16, "widen_factor": 4}
_WRN_NAME = re.compile(r"wrn-(\d+)-(\d+)")
_VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "cnn1d-bn": ("cnn1d", {"norm": "batch"}),
    "cnn1d-ln": ("cnn1d", {"norm": "layer"}),
}
"""Names that fix options of a registered model (as ``wrn-D-K`` does)."""

NORMALISED_MODELS: tuple[str, ...] = ("cnn", "cnn1d-bn", "cnn1d-ln", "resnet18", "wrn", "wrn-D-K")
"""Names of the built-in models that have normalisation layers with affine parameters (with default options)."""


def _valid_names() -> str:
    return ", ".join((*MODELS, *_VARIANTS)) + ", wrn-D-K (e.g. wrn-28-10, wrn-16-4)"


def has_normalisation(name: str) -> bool:
    """Whether the built-in model ``name`` (default options) has normalisation layers (:data:`NORMALISED_MODELS`)."""
    key, implied = parse_model_name(name)
    return key in ("cnn", "resnet18", "wrn") or implied.get("norm", "none") != "none"


def parse_model_name(name: str) -> tuple[str, dict[str, object]]:
    """Split a model name into its registry key and the options its spelling implies.

    ``"WRN-28-10"`` gives ``("wrn", {"depth": 28, "widen_factor": 10})``; ``"wrn"`` gives
    ``("wrn", {"depth": 16, "widen_factor": 4})``; ``"cnn1d-bn"`` gives ``("cnn1d", {"norm": "batch"})``; other
    names give ``(name.lower(), {})``.

    Raises:
        TypeError: if ``name`` is not a string.
        ValueError: for an unknown name (the message lists the valid ones) or an invalid WRN depth.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key in _BUILDERS:
        return key, (dict(_WRN_DEFAULTS) if key == "wrn" else {})
    if key in _VARIANTS:
        base, implied = _VARIANTS[key]
        return base, dict(implied)
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
        name: model name, case-insensitive: one of :data:`MODELS`, ``cnn1d-bn``, ``cnn1d-ln``, or ``wrn-D-K``
            (e.g. ``wrn-28-10``). Plain ``wrn`` is WRN-16-4.
        input_shape: shape of one example, without the batch dimension: ``(L,)`` or ``(C, L)`` for ``cnn1d``;
            ``(C, H, W)`` for ``cnn``, ``resnet18`` and ``wrn``; anything for ``mlp`` (it flattens).
        num_classes: number of outputs (logits).
        **options: model options: ``mlp``: ``hidden``, ``activation``, ``bias``; ``cnn1d``: ``channels``, ``norm``;
            ``cnn``: ``channels``, ``batchnorm``; ``resnet18``: ``width``; ``wrn``: ``depth``, ``widen_factor``,
            ``dropout``. Values may also be given as strings (``"256,256"``, ``"0.3"``, ``"true"``).

    The parameters are initialised from PyTorch's global random generator, so ``torch.manual_seed(s)`` before
    the call makes the weights reproducible.

    Raises:
        ValueError: for an unknown name, an invalid option value, an invalid ``input_shape`` for the model, or a
            ``wrn-D-K`` name together with a different ``depth`` / ``widen_factor`` option.
        TypeError: for an option the model does not accept.

    >>> model = build_model("cnn1d", input_shape=(40,), num_classes=10)
    >>> [name for name, _ in model.named_parameters()][-2:]
    ['head.weight', 'head.bias']
    """
    key, implied = parse_model_name(name)
    builder, accepted = _BUILDERS[key]
    unknown = [option for option in options if option not in accepted]
    if unknown:
        raise TypeError(
            f"model {name!r} does not accept option(s) {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(accepted)}"
        )
    if name.strip().lower() != key:  # the name fixes its implied options (plain "wrn" only has defaults)
        for option, value in implied.items():
            if option in options and options[option] != value and str(options[option]).strip() != str(value):
                raise ValueError(
                    f"model {name!r} fixes {option}={value}, but the option {option}={options[option]!r} was also "
                    f"given; use plain {key!r} with options, or the name {name!r} alone"
                )
    return builder(input_shape, num_classes, **{**implied, **options})


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``model`` (shared parameters counted once).

    With ``trainable_only=True``, only parameters with ``requires_grad`` are counted.

    >>> import torch
    >>> count_parameters(torch.nn.Linear(3, 2))
    8
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
