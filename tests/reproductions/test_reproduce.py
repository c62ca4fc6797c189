"""The reproduction framework: files, strict JSON, the PASS/FAIL/UNDECIDED table, the decidability rule and the
exit code."""

import json
import math
from pathlib import Path

import pytest
import stand_in_reproduction

from sharpness.cli import main
from sharpness.reproductions import REPRODUCTIONS, Check, ci_decidable, reproduce


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(REPRODUCTIONS, "stand-in", "stand_in_reproduction")
    monkeypatch.setitem(stand_in_reproduction.FAIL, "value", False)
    monkeypatch.setitem(stand_in_reproduction.UNDECIDED, "value", False)
    return stand_in_reproduction


def test_files_and_strict_json(stand_in, tmp_path: Path) -> None:
    (result,) = reproduce("stand-in", tmp_path, quick=True, seed=7)
    saved = json.loads((tmp_path / "stand-in" / "results.json").read_text())
    assert saved["passed"] is True and saved["status"] == "PASS"
    assert saved["settings"] == {"steps": 3, "quick": True, "seed": 7}
    assert saved["numbers"] == {"answer": 42, "missing": "nan"}  # NaN written as a string: strict JSON
    check = {"claim": "one plus one is two", "passed": True, "detail": "1 + 1 = 2", "decided": True, "status": "PASS"}
    assert saved["checks"][0] == check
    page = (tmp_path / "stand-in" / "report.html").read_text()
    assert "PASS" in page and 'src="line.png"' in page and "the number of steps is arbitrary" in page
    assert (tmp_path / "stand-in" / "line.png").is_file() and result.seconds > 0


def test_cli_exit_code_follows_the_checks(stand_in, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["reproduce", "stand-in", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "PASS  one plus one is two" in out and "note: the number of steps is arbitrary" in out
    stand_in.FAIL["value"] = True
    assert main(["reproduce", "stand-in", "--out", str(tmp_path)]) == 1
    assert "FAIL  pi is rational" in capsys.readouterr().out


def test_undecided_claims_neither_pass_nor_fail(stand_in, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Exit 0 with UNDECIDED claims (printed and saved as such), 1 as soon as a claim also fails."""
    stand_in.UNDECIDED["value"] = True
    assert main(["reproduce", "stand-in", "--out", str(tmp_path)]) == 0
    assert "UNDECIDED  two seeds settle it" in capsys.readouterr().out
    saved = json.loads((tmp_path / "stand-in" / "results.json").read_text())
    assert (saved["passed"], saved["status"], saved["checks"][1]["status"]) == (False, "UNDECIDED", "UNDECIDED")
    assert "<td>UNDECIDED</td>" in (tmp_path / "stand-in" / "report.html").read_text()
    stand_in.FAIL["value"] = True
    assert main(["reproduce", "stand-in", "--out", str(tmp_path)]) == 1
    assert json.loads((tmp_path / "stand-in" / "results.json").read_text())["status"] == "FAIL"


@pytest.mark.parametrize(
    "seeds, half_width, effect, decidable",
    [
        (5, 0.0016, 0.0042, True),  # the full `efficient` run: SAM ± 0.16 pts against a gain over SGD of 0.42
        (5, 0.0050, 0.0042, False),  # the interval reaches below SGD's mean: SGD itself would pass
        (5, 0.0016, -0.0042, True),  # the size of the effect counts, not its sign
        (2, 0.0001, 0.0500, False),  # 2 seeds: t = 12.7, never decidable
        (3, 0.0010, 0.0500, True),
        (3, math.nan, 0.0500, False),
        (3, 0.0010, 0.0, False),  # no effect to resolve
    ],
)
def test_ci_decidable_rule(seeds: int, half_width: float, effect: float, decidable: bool) -> None:
    assert ci_decidable(seeds, half_width, effect) is decidable


def test_check_status() -> None:
    assert [Check("c", p, "d", decided=d).status for p, d in ((True, True), (False, True), (True, False))] == [
        "PASS",
        "FAIL",
        "UNDECIDED",
    ]
    assert Check("c", False, "d", decided=False).status == "UNDECIDED"


def test_all_builds_one_report_and_unknown_names_fail_first(
    stand_in, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr("sharpness.reproductions.REPRODUCTIONS", {"stand-in": "stand_in_reproduction"})
    reproduce("all", tmp_path, quick=True)
    assert 'src="stand-in/line.png"' in (tmp_path / "report.html").read_text()
    assert main(["reproduce", "edge-of-chaos", "--out", str(tmp_path / "x")]) == 2
    assert "unknown reproduction 'edge-of-chaos'; valid: stand-in, all" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_least_squares_quick_through_the_cli_passes_every_check(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["reproduce", "least-squares", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 8 and "FAIL" not in out
    saved = json.loads((tmp_path / "least-squares" / "results.json").read_text())
    assert saved["passed"] and len(saved["figures"]) == 4 and saved["settings"]["quick"] is True
