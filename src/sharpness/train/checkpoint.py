"""Atomic writes (temp file + rename), strict JSON, and checked reads of checkpoints and run files."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_KEYS = (
    "format",
    "train_state",
    "model",
    "optimizer",
    "scheduler",
    "shuffle_generator",
    "augment_generator",
    "torch_rng",
    "callbacks",
)
"""The entries of every checkpoint :class:`~sharpness.train.Trainer` writes (``cuda_rng`` is optional)."""
_TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"\..+\.\w{8,12}\.tmp")  # ".NAME.RANDOM.tmp" (12 hex digits; mkstemp's 8 before)


def _open_temp(path: Path) -> tuple[int, Path]:
    """A new, empty temp file beside ``path``, open for writing.

    It is created with mode ``0o666`` less the umask, as ``open`` creates files (``tempfile.mkstemp``'s would be
    ``0o600``, and the rename would hand that mode to the final file).
    """
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{_TEMP_SUFFIX}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:  # pragma: no cover - a 48-bit name collision
            continue


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write`` into a temp file beside ``path``, fsync, then rename over ``path``.

    A reader sees the old file or the new one, never a partial one, even if the process dies mid-write; a
    temp file left by a killed process is removed by :func:`remove_stale_temps`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _open_temp(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temp files that :func:`_atomic_write` calls killed before their rename left in ``folder``.

    Call it when no other process writes into ``folder`` (at the start of a run). Returns the removed paths.
    """
    stale = sorted(path for path in Path(folder).glob(f".*{_TEMP_SUFFIX}") if _TEMP_NAME.fullmatch(path.name))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` ``state`` to ``path`` atomically."""
    _atomic_write(Path(path), lambda handle: torch.save(state, handle))


def json_safe(obj: Any, non_finite: Callable[[float], Any]) -> Any:
    """``obj`` with every non-finite float replaced by ``non_finite(value)`` (strict JSON has no NaN/inf)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else non_finite(obj)
    if isinstance(obj, dict):
        return {key: json_safe(value, non_finite) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(value, non_finite) for value in obj]
    return obj


def to_json(obj: Any, *, indent: int | None = None) -> str:
    """``obj`` as strict JSON: every NaN or infinity becomes ``null`` (``json.dumps`` would write ``NaN``)."""
    return json.dumps(json_safe(obj, non_finite=lambda _: None), indent=indent, allow_nan=False)


def nan_for_null(record: dict[str, Any]) -> dict[str, Any]:
    """A flat record of numbers read back from strict JSON, its ``null`` s (non-finite numbers) NaN again."""
    return {key: math.nan if value is None else value for key, value in record.items()}


def write_json(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as indented strict JSON (:func:`to_json`) atomically."""
    data = (to_json(obj, indent=2) + "\n").encode()
    _atomic_write(Path(path), lambda handle: handle.write(data))


def read_json(path: str | Path) -> Any:
    """The JSON in ``path``; ``FileNotFoundError`` or a one-line ``ValueError`` naming the file otherwise."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(
            f"{path} is not readable JSON ({exc}); the run folder is damaged: restore the file, or start a new run"
        ) from None


def _load_error(path: Path, exc: BaseException) -> str:
    """Why ``torch.load`` failed on ``path``, and what to do, on one line (torch's messages run to many lines)."""
    text = str(exc)
    _, found, detail = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (detail if found else text).splitlines() if line.strip()]
    gist = lines[0].split(". ")[0].rstrip(".") if lines else type(exc).__name__
    if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in gist:
        return (
            f"checkpoint {path} refers to Python code ({gist}); loading it could run that code, so it is refused: "
            "use a checkpoint written by sharpness"
        )
    return f"checkpoint {path} is corrupt or unreadable ({gist}); restore it from a copy, or start a new run"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; a run folder means its ``checkpoint.pt``.

    Only tensors and plain data are loaded (``weights_only=True``): a file whose pickle would import or call
    anything else is refused without running it. Raises ``FileNotFoundError`` naming the file when it is missing
    and a one-line ``ValueError`` naming it when it is refused, corrupt or not a complete ``sharpness`` training
    checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated, garbled or refused files
        raise ValueError(_load_error(path, exc)) from None
    if not isinstance(state, dict) or state.get("format") != 1:
        raise ValueError(f"{path} is not a sharpness training checkpoint (no 'format' 1); use a run's checkpoint.pt")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise ValueError(
            f"{path} is not a complete sharpness training checkpoint: it lacks {', '.join(map(repr, missing))}; "
            "use the checkpoint.pt that sharpness train wrote"
        )
    return state


def load_weights(model: nn.Module, weights: Any, *, load: bool = True) -> None:
    """``model.load_state_dict(weights)``, or a one-line ``ValueError`` saying how the weights do not fit.

    With ``load=False`` only the check is made (a sharded model loads its shards of the weights another way).
    """
    if not isinstance(weights, dict):
        raise ValueError(f"the model weights are a {type(weights).__name__}, not a dict of tensors")
    expected = model.state_dict()
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    reshaped = [
        key
        for key, tensor in expected.items()
        if key in weights and (not isinstance(weights[key], torch.Tensor) or weights[key].shape != tensor.shape)
    ]
    problems = [
        f"{what} {_some(keys)}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shapes for", reshaped))
        if keys
    ]
    if problems:
        raise ValueError(f"the weights do not fit the {type(model).__name__} model: {'; '.join(problems)}")
    if load:
        model.load_state_dict(weights)


def _some(keys: list[str], shown: int = 3) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
