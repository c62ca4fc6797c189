"""Atomic writes (temp file + rename) and checked reads of checkpoints and run files."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write`` into a temp file beside ``path``, fsync, then rename over ``path``.

    A reader sees the old file or the new one, never a partial one, even if the process dies mid-write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` ``state`` to ``path`` atomically."""
    _atomic_write(Path(path), lambda handle: torch.save(state, handle))


def write_json(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as indented JSON atomically."""
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    _atomic_write(Path(path), lambda handle: handle.write(data))


def json_safe(obj: Any, non_finite: Callable[[float], Any]) -> Any:
    """``obj`` with every non-finite float replaced by ``non_finite(value)`` (strict JSON has no NaN/inf)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else non_finite(obj)
    if isinstance(obj, dict):
        return {key: json_safe(value, non_finite) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(value, non_finite) for value in obj]
    return obj


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; a run folder means its ``checkpoint.pt``.

    Raises ``FileNotFoundError`` naming the file when it is missing and ``ValueError`` naming it when it is
    corrupt or not a ``sharpness`` training checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/garbled files
        raise ValueError(f"checkpoint {path} is corrupt or unreadable: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != 1 or "train_state" not in state:
        raise ValueError(f"{path} is not a sharpness training checkpoint (missing 'format'/'train_state')")
    return state
