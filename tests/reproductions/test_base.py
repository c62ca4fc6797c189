"""The shared structure of reproductions: steps' Findings gathered in order into a Paper's Reproduction."""

from pathlib import Path

import pytest

from sharpness.reproductions.base import Check, Findings, Paper, output_folder


def test_findings_gather_checks_figures_and_numbers_in_order() -> None:
    first = Findings([Check("a", True, "1")], [Path("a.png")], {"a": 1})
    second = Findings([Check("b", False, "2"), Check("c", True, "3", decided=False)], numbers={"b": 2})
    gathered = Findings(numbers={"setup": 0}).add(first, second)
    assert [c.claim for c in gathered.checks] == ["a", "b", "c"]
    assert gathered.figures == [Path("a.png")]
    assert list(gathered.numbers) == ["setup", "a", "b"]
    assert first.checks == [Check("a", True, "1")]  # the steps' own findings are left alone


def test_a_number_reported_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="numbers reported twice: a"):
        Findings(numbers={"a": 1}).add(Findings(numbers={"a": 2}))


def test_paper_builds_the_reproduction(tmp_path: Path) -> None:
    findings = Findings([Check("a", True, "1"), Check("b", True, "2", decided=False)], [tmp_path / "f.png"], {"x": 1})
    result = Paper("name", "Title", "Someone, 2026").reproduction(findings, {"steps": 3}, ["an assumption"])
    assert (result.name, result.title, result.reference) == ("name", "Title", "Someone, 2026")
    assert result.checks == findings.checks and result.checks is not findings.checks
    assert result.figures == [tmp_path / "f.png"] and result.numbers == {"x": 1}
    assert result.settings == {"steps": 3} and result.assumptions == ["an assumption"]
    assert result.status == "UNDECIDED"


def test_output_folder_is_created(tmp_path: Path) -> None:
    folder = output_folder(str(tmp_path / "a" / "b"))
    assert folder == tmp_path / "a" / "b" and folder.is_dir()
