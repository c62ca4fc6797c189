"""The HTML reports (issue 17): the compare report's table with passes per step and cost relative to SGD, its
accuracy-against-cost figure, cells that wrap, settings as tables."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from sharpness.cli import main
from sharpness.experiments.report import settings_table

TINY = ["--dataset", "synthetic", "--epochs", "1", "--batch-size", "32", "--threads", "1", "--quiet"]


class _Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts (nested tables are tables of their own)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._open: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "table":
            self._open.append([])
        elif tag == "tr" and self._open:
            self._open[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._open:
            self._open[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table" and self._open:
            self.tables.append(self._open.pop())

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _tables(page: str) -> list[list[list[str]]]:
    parser = _Tables()
    parser.feed(page)
    return parser.tables


def test_the_compare_report_shows_passes_per_step_and_cost_relative_to_sgd(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = ["compare", *TINY, "--seeds", "2", "--optimizers", "sgd,sam,periodicsam", "--k", "2"]
    assert main([*args, "--out", str(out)]) == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    summary = next(t for t in _tables(page) if t[0][0] == "optimizer")
    header, rows = summary[0], {row[0]: row for row in summary[1:]}
    steps = json.loads((out / "runs" / "sgd-seed0" / "final.json").read_text())["steps"]
    passes = {name: float(rows[name][header.index("passes/step")]) for name in rows}
    assert passes["sgd"] == 1.0 and passes["sam"] == 2.0
    assert passes["periodicsam"] == pytest.approx(1 + math.ceil(steps / 2) / steps, abs=0.005)  # SAM every 2nd step
    cpu = header.index("CPU s")
    assert header[cpu + 1] == "× SGD" and rows["sgd"][cpu + 1] == "1.00"
    saved = json.loads((out / "summary.json").read_text())["rows"]
    means = {r["optimizer"]: r["train_cpu_seconds_mean"] for r in saved}
    assert rows["sam"][cpu + 1] == f"{means['sam'] / means['sgd']:.2f}"  # SAM's CPU time over SGD's
    assert "<b>passes/step</b>: forward/backward passes per optimizer step" in page  # the column's meaning
    assert "relative to SGD" in page
    assert 'src="frontier.png"' in page and (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    for name in re.findall(r'<img src="([^"]+)"', page):  # self-contained: every image is a file beside it
        assert (out / name).is_file(), name
    assert "overflow-wrap:anywhere" in page
    assert "95% confidence interval" in page  # the learning-curve band is said to be the table's CI


def test_settings_tables_nest_and_keep_non_ascii_text() -> None:
    table = settings_table({"spectrum": "Σ̂ = XᵀX/n", "kernel": {"eta": 0.5, "f": "sin(2πx)"}, "etas": [0.1, 0.2]})
    assert "Σ̂ = XᵀX/n" in table and "\\u03a3" not in table
    assert table.count("<table>") == 2  # the nested dict is a table in its cell
    assert "<th class=key>eta</th><td class=text>0.5</td>" in table and "0.1, 0.2" in table
    assert settings_table({"a": "<b>"}).count("&lt;b&gt;") == 1
