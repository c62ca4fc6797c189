"""The edge-of-stability reproduction (Long & Bartlett; Cohen et al. 2021, 2022) passes its checks in quick mode."""

import json
from pathlib import Path

import pytest
import torch

from sharpness.reproductions.edge_of_stability import run


def test_quick_run_passes_and_writes_its_outputs(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    try:
        result = run(tmp_path, quick=True, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert result.name == "edge-of-stability" and len(result.checks) == 4
    assert result.passed, [(c.claim, c.detail) for c in result.checks if not c.passed]
    assert result.figures and all(p.is_file() and p.suffix == ".png" and p.parent == tmp_path for p in result.figures)
    json.dumps(result.numbers, allow_nan=False)
    json.dumps(result.settings, allow_nan=False)
    summaries = result.numbers["summaries"]
    assert set(summaries) == {"GD", "SAM ρ=0.02", "SAM ρ=0.05"}
    assert all(s["lanczos_all_converged"] for s in summaries.values())
    adam = result.numbers["adam"]["summary"]
    assert adam["edge_kind"] == "adam" and adam["edge"] == pytest.approx(38 / 2e-3) and adam["lanczos_all_converged"]
    assert 0.9 <= adam["median_ratio_to_edge"] <= 1.1 and adam["max_raw_ratio_to_2_over_eta_settled"] < 0.5
    assert {p.name for p in result.figures} == {"edge_of_stability.png", "edge_of_stability_adam.png"}
