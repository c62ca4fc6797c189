"""A reproduction's report.html (issue 17): the claims, then the figures, then the settings as a table with its text
as written (``Σ``, not ``\\u03a3``); cells wrap long text."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from sharpness.experiments.figures import panels, save_figure
from sharpness.reproductions import REPRODUCTIONS, reproduce
from sharpness.reproductions.base import Check, Reproduction


def _run(out_dir: Path, quick: bool, seed: int) -> Reproduction:
    fig, ax = panels()
    ax.plot([0, 1], [0, 1])
    figure = save_figure(fig, out_dir / "figure.png")
    return Reproduction(
        name="html-check",
        title="HTML check",
        reference="nobody, 2026",
        checks=[Check("Σ of nothing is 0", True, "Σ ∅ = 0")],
        figures=[figure],
        settings={"design": "Σ̂ has eigenvalues λ_i = i^-1", "kernel": {"η": 0.5, "width": 2}, "etas": [0.1, 0.2]},
        assumptions=["an assumption"],
    )


@pytest.fixture
def html_check(monkeypatch: pytest.MonkeyPatch) -> str:
    module = types.ModuleType("html_check_reproduction")
    module.run = _run
    monkeypatch.setitem(__import__("sys").modules, "html_check_reproduction", module)
    monkeypatch.setitem(REPRODUCTIONS, "html-check", "html_check_reproduction")
    return "html-check"


def test_the_report_shows_claims_then_figures_then_a_settings_table(html_check: str, tmp_path: Path) -> None:
    reproduce(html_check, tmp_path, quick=True)
    page = (tmp_path / html_check / "report.html").read_text(encoding="utf-8")
    claims, image, settings = page.index("<th>verdict</th>"), page.index("<img"), page.index("<h3>Settings</h3>")
    assert claims < image < settings
    assert page.index("an assumption") > settings
    table = page[settings:]
    assert "<th class=key>design</th><td class=text>Σ̂ has eigenvalues λ_i = i^-1</td>" in table
    assert "<th class=key>η</th><td class=text>0.5</td>" in table  # a nested setting, in a table of its own
    assert "<th class=key>quick</th><td class=text>True</td>" in table and "0.1, 0.2" in table
    assert "\\u03a3" not in page and "\\u03b7" not in page and "{&quot;" not in page  # no JSON with escapes
    assert "overflow-wrap:anywhere" in page
    saved = (tmp_path / html_check / "results.json").read_text(encoding="utf-8")
    assert "Σ̂ has eigenvalues" in saved and json.loads(saved)["settings"]["kernel"] == {"η": 0.5, "width": 2}


def test_the_combined_report_keeps_the_order_in_each_section(html_check: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("sharpness.reproductions.REPRODUCTIONS", {html_check: "html_check_reproduction"})
    reproduce("all", tmp_path, quick=True)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert page.index("<th>verdict</th>") < page.index('<img src="html-check/figure.png"') < page.index("Settings<")
