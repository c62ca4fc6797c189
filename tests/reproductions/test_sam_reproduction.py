"""The SAM reproduction (Foret et al. 2021) runs in quick mode, its claims hold, and it writes its outputs."""

import json

import pytest

from sharpness.reproductions.sam import QUICK, run


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("sam")
    return out, run(out, quick=True, seed=0)


def test_quick_run_claims_hold(quick) -> None:
    _, result = quick
    assert result.name == "sam" and len(result.checks) == 5
    for check in result.checks:
        assert check.passed, f"{check.claim}: {check.detail}"


def test_quick_run_numbers_and_outputs(quick) -> None:
    out, result = quick
    assert [p.name for p in result.figures] == ["label_noise.png", "hessian_spectrum.png", "m_sharpness.png"]
    assert all(p.is_file() and p.parent == out for p in result.figures)
    json.dumps(result.numbers, allow_nan=False)
    json.dumps(result.settings, allow_nan=False)
    models = result.numbers["clean_models"]
    # SGD, SAM and one m-SAM group over the quick seeds, each measured at every m
    assert len(models) == QUICK.seeds * (2 + len(QUICK.micro_batches))
    for model in models:
        assert set(model["m_sharpness"]) == {str(m) for m in QUICK.measure_m}
        assert all(value >= 0 for value in model["m_sharpness"].values())  # δ = 0 is in the ball
        assert model["gap"] == pytest.approx(model["train_acc"] - model["test_acc"])
    for runs in result.numbers["noisy_runs"].values():
        for r in runs:  # under label noise the model is scored on the noisy labels it was trained on
            assert r["train_acc"] != r["train_clean_acc"]
