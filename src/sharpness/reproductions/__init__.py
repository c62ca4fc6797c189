"""``sharpness reproduce NAME [--quick]``: the papers' experiments, with their claims checked PASS/FAIL/UNDECIDED.

Each reproduction is a module with ``run(out_dir, quick, seed) -> Reproduction``; it writes its figures into
``out_dir``. :func:`reproduce` runs one or all of them, writes ``results.json`` (the numbers, settings and checks)
and a ``report.html`` per reproduction, and a combined ``report.html`` for ``all``. A claim whose check could not
have failed at the run's budget (e.g. a CI-based check over too few seeds, :func:`~.base.ci_decidable`) is
UNDECIDED: neither passed nor failed.
"""

from __future__ import annotations

import dataclasses
import html
import importlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sharpness.experiments.report import PAGE_STYLE, settings_table
from sharpness.reproductions.base import Check, Reproduction, ci_decidable
from sharpness.train.checkpoint import json_safe

REPRODUCTIONS: dict[str, str] = {  # in the order of papers.md
    "sam": "sharpness.reproductions.sam",
    "efficient": "sharpness.reproductions.efficient",
    "least-squares": "sharpness.reproductions.least_squares",
    "linear-stability": "sharpness.reproductions.linear_stability",
    "edge-of-stability": "sharpness.reproductions.edge_of_stability",
}
"""Name -> module with a ``run(out_dir, quick, seed)`` function (imported when run)."""

Runner = Callable[[Path, bool, int], Reproduction]


def runner(name: str) -> Runner:
    if name not in REPRODUCTIONS:
        raise ValueError(f"unknown reproduction {name!r}; valid: {', '.join(REPRODUCTIONS)}, all")
    return importlib.import_module(REPRODUCTIONS[name]).run


def reproduce(name: str, out_dir: str | Path, *, quick: bool = False, seed: int = 0) -> list[Reproduction]:
    """Run ``name`` (or ``"all"``) into ``out_dir/NAME/``; returns the reproductions in order."""
    names = list(REPRODUCTIONS) if name == "all" else [name]
    runners = [runner(n) for n in names]  # unknown names fail before anything runs
    out_dir = Path(out_dir)
    results = []
    for n, run in zip(names, runners, strict=True):
        folder = out_dir / n
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        result = run(folder, quick, seed)
        result.seconds = time.perf_counter() - started
        result.settings.setdefault("quick", quick)
        result.settings.setdefault("seed", seed)
        text = json.dumps(_jsonable(result), indent=2, allow_nan=False, ensure_ascii=False)  # Σ as itself, not escaped
        (folder / "results.json").write_text(text + "\n", encoding="utf-8")
        (folder / "report.html").write_text(_page(result.title, [_section(result, folder)]), encoding="utf-8")
        results.append(result)
    if name == "all":
        sections = [_section(r, out_dir / r.name, prefix=f"{r.name}/") for r in results]
        (out_dir / "report.html").write_text(_page("sharpness: reproductions", sections), encoding="utf-8")
    return results


def format_checks(result: Reproduction) -> str:
    """The claims and their verdicts as a plain-text table (what the command prints)."""
    lines = [f"{result.title}  ({result.reference})  [{result.seconds:.1f} s]"]
    for check in result.checks:
        lines.append(f"  {check.status}  {check.claim}")
        lines.append(f"        {check.detail}")
    for assumption in result.assumptions:
        lines.append(f"  note: {assumption}")
    return "\n".join(lines)


def _jsonable(result: Reproduction) -> dict[str, Any]:
    return {
        "name": result.name,
        "title": result.title,
        "reference": result.reference,
        "passed": result.passed,
        "status": result.status,
        "seconds": result.seconds,
        "checks": [{**dataclasses.asdict(check), "status": check.status} for check in result.checks],
        "figures": [Path(figure).name for figure in result.figures],
        "settings": json_safe(result.settings, non_finite=str),
        "assumptions": result.assumptions,
        "numbers": json_safe(result.numbers, non_finite=str),
    }


def _section(result: Reproduction, folder: Path, prefix: str = "") -> str:
    """One reproduction: its title and reference, the claims with their verdicts, the figures, then the settings (a
    table, nested settings as tables in their cells) and the settings the paper leaves open."""
    rows = "".join(
        f"<tr><td>{'<b>FAIL</b>' if c.status == 'FAIL' else c.status}</td><td>{html.escape(c.claim)}</td>"
        f"<td>{html.escape(c.detail)}</td></tr>"
        for c in result.checks
    )
    figures = "".join(
        f'<img src="{html.escape(prefix + Path(f).name)}" alt="{html.escape(Path(f).stem)}" width="100%">'
        for f in result.figures
    )
    notes = "".join(f"<li>{html.escape(a)}</li>" for a in result.assumptions)
    return (
        f"<h2>{html.escape(result.title)}</h2><p>{html.escape(result.reference)}; {result.seconds:.1f} s</p>"
        f"<table class=claims><tr><th>verdict</th><th>claim</th><th>numbers</th></tr>{rows}</table>"
        + figures
        + f"<h3>Settings</h3>{settings_table(json_safe(result.settings, non_finite=str))}"
        + (f"<p>Settings the paper leaves open:</p><ul>{notes}</ul>" if notes else "")
    )


def _page(title: str, sections: list[str]) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{PAGE_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>\n"
    )


__all__ = ["Check", "REPRODUCTIONS", "Reproduction", "ci_decidable", "format_checks", "reproduce", "runner"]
