"""What a reproduction returns: the paper's claims as checks with PASS/FAIL/UNDECIDED, its figures and its numbers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

MIN_SEEDS = 3
"""Fewest seeds for a decidable CI check: with 2, ``t_{0.975,1} = 12.7`` stretches the 95% interval's half-width to 12.7
standard errors (9 standard deviations of the seeds' values)."""

Status = Literal["PASS", "FAIL", "UNDECIDED"]


@dataclass(frozen=True)
class Check:
    """One falsifiable claim of a paper, tested on the reproduction's own numbers.

    ``decided=False`` marks a check that could not have failed at this budget (see :func:`ci_decidable`): its
    :attr:`status` is ``"UNDECIDED"`` whatever ``passed`` says (``passed`` keeps what the numbers lean to).
    """

    claim: str  # the paper's statement, in words
    passed: bool
    detail: str  # the numbers the verdict rests on, e.g. "max_k (Bias_SAM - Bias_GD) = -3.1e-4 <= 0"
    decided: bool = True

    @property
    def status(self) -> Status:
        if not self.decided:
            return "UNDECIDED"
        return "PASS" if self.passed else "FAIL"


def ci_decidable(seeds: int, half_width: float, effect: float) -> bool:
    """Whether a claim accepted within a 95% CI over seeds ("A is at least B's mean − B's CI half-width") can fail.

    Such a check grows more lenient as the interval widens, so a wide interval passes anything. The rule: it is
    decidable only with at least :data:`MIN_SEEDS` seeds and a finite CI half-width smaller than ``|effect|``, the
    size of the effect the claim is about (e.g. for "reaches SAM's accuracy": SAM's gain over SGD; a tolerance as
    wide as that gain would accept a method no better than SGD). Checks that need the interval to *exclude* a value
    (e.g. "the CI of the paired gain lies above 0") grow stricter as it widens and can always fail; they do not
    need this rule.
    """
    return seeds >= MIN_SEEDS and math.isfinite(half_width) and half_width < abs(effect)


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
        """Every check decided and passed."""
        return all(check.status == "PASS" for check in self.checks)

    @property
    def status(self) -> Status:
        """``"FAIL"`` if a check failed, else ``"UNDECIDED"`` if one was not decidable, else ``"PASS"``."""
        statuses = {check.status for check in self.checks}
        return next((s for s in ("FAIL", "UNDECIDED") if s in statuses), "PASS")
