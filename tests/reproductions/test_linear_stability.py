"""The linear-stability reproduction (Wu, Wang & Su 2022) runs in quick mode and writes its outputs."""

import json
from pathlib import Path

from sharpness.reproductions.linear_stability import run


def test_quick_run_checks_and_outputs(tmp_path: Path) -> None:
    result = run(tmp_path, quick=True, seed=0)
    assert result.name == "linear-stability" and len(result.checks) == 4
    for check in result.checks:
        assert check.passed, f"{check.claim}: {check.detail}"
    assert result.figures and all(p.is_file() and p.suffix == ".png" and p.parent == tmp_path for p in result.figures)
    json.dumps(result.numbers, allow_nan=False)
    json.dumps(result.settings, allow_nan=False)
