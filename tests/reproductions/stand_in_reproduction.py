"""A stand-in reproduction for testing the framework: one figure, a passing claim, optional failing and undecidable
claims."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sharpness.reproductions.base import Check, Reproduction  # noqa: E402

FAIL = {"value": False}
UNDECIDED = {"value": False}


def run(out_dir: Path, quick: bool, seed: int) -> Reproduction:
    figure = out_dir / "line.png"
    fig, axis = plt.subplots()
    axis.plot([0, 1], [seed, seed + 1])
    fig.savefig(figure)
    plt.close(fig)
    checks = [Check("one plus one is two", 1 + 1 == 2, "1 + 1 = 2")]
    if FAIL["value"]:
        checks.append(Check("pi is rational", False, "it is not"))
    if UNDECIDED["value"]:
        checks.append(Check("two seeds settle it", True, "a CI over 2 seeds", decided=False))
    return Reproduction(
        name="stand-in",
        title="Stand-in",
        reference="nobody, 2026",
        checks=checks,
        figures=[figure],
        numbers={"answer": 42, "missing": float("nan")},
        settings={"steps": 3 if quick else 30},
        assumptions=["the number of steps is arbitrary"],
    )
