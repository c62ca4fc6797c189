"""What a reproduction returns: the paper's claims as checks with PASS/FAIL/UNDECIDED, its figures and its numbers.

A reproduction's ``run`` is a sequence of experiment steps, each returning the :class:`Findings` it produced (the checks
of the claims it tests, its figures, its numbers); :meth:`Paper.reproduction` gathers them into the
:class:`Reproduction`.
"""

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


@dataclass
class Findings:
    """What one step of a reproduction's experiment produced: the checks of the claims it tests (in the order they are
    reported), the figures it wrote and its numbers (top-level entries of :attr:`Reproduction.numbers`)."""

    checks: list[Check] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)

    def add(self, *steps: Findings) -> Findings:
        """Append the checks and figures of ``steps`` in order and merge their numbers; returns ``self``.

        Raises ``ValueError`` if two steps report the same number (one would silently replace the other).
        """
        for step in steps:
            shared = self.numbers.keys() & step.numbers.keys()
            if shared:
                raise ValueError(f"numbers reported twice: {', '.join(sorted(shared))}")
            self.checks.extend(step.checks)
            self.figures.extend(step.figures)
            self.numbers.update(step.numbers)
        return self


@dataclass(frozen=True)
class Paper:
    """The paper a reproduction tests: its command-line name, a title stating its claims, and the reference."""

    name: str  # as in ``sharpness reproduce NAME``
    title: str
    reference: str  # e.g. "Behdin & Mazumder, arXiv 2302.11836v2"

    def reproduction(self, findings: Findings, settings: dict[str, Any], assumptions: list[str]) -> Reproduction:
        """The outcome of a run: ``findings`` gathered from its steps, with every setting used and the settings the
        paper leaves open (``assumptions``)."""
        return Reproduction(
            name=self.name,
            title=self.title,
            reference=self.reference,
            checks=list(findings.checks),
            figures=list(findings.figures),
            numbers=dict(findings.numbers),
            settings=settings,
            assumptions=assumptions,
        )


def output_folder(out_dir: str | Path) -> Path:
    """``out_dir`` as a ``Path``, created if missing: where a reproduction writes its figures."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
