"""What a reproduction returns: the paper's claims as checks with PASS/FAIL, its figures and its numbers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Check:
    """One falsifiable claim of a paper, tested on the reproduction's own numbers."""

    claim: str  # the paper's statement, in words
    passed: bool
    detail: str  # the numbers the verdict rests on, e.g. "max_k (Bias_SAM - Bias_GD) = -3.1e-4 <= 0"


@dataclass
class Reproduction:
    """The outcome of one ``sharpness reproduce NAME``.

    ``numbers`` must be JSON-serialisable (floats, ints, strings, lists, dicts). ``settings`` records every setting
    used, and ``assumptions`` the settings that the paper does not pin down (they are exposed as options and printed).
    """

    name: str
    title: str
    reference: str  # the paper, e.g. "Behdin & Mazumder, arXiv 2302.11836v2"
    checks: list[Check]
    figures: list[Path] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)
    seconds: float = 0.0  # wall-clock of the run, set by sharpness.reproductions.reproduce

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)
