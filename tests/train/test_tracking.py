"""The sharpness tracker with optimizer-aware edges: Adam's preconditioned sharpness, switching policies, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sharpness import SAM, LateSAM
from sharpness.cli import main
from sharpness.curvature import HessianOperator
from sharpness.curvature.edges import adam_edge, momentum_edge, sam_edge
from sharpness.curvature.preconditioned import PreconditionedOperator, adaptive_preconditioner
from sharpness.data import load_dataset
from sharpness.models import build_model
from sharpness.train import Trainer
from sharpness.train.tracking import SharpnessTracker

MEASURE = 64


def _trainer(make_optimizer, tracker: SharpnessTracker, epochs: int = 2) -> Trainer:
    data = load_dataset("synthetic", seed=0, n_train=96, n_test=32, dim=6)
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=data.input_shape, num_classes=data.num_classes, hidden=(12,))
    return Trainer(model, make_optimizer(model), data, epochs=epochs, batch_size=16, callbacks=[tracker])


def _dense_top(trainer: Trainer, precondition: bool) -> float:
    """λ_max of the dense (preconditioned) Hessian on the tracker's measurement set, in float64."""
    x, y = trainer.data.x_train[:MEASURE], trainer.data.y_train[:MEASURE]
    op = HessianOperator(trainer.model, trainer.loss_fn, (x, y))
    if precondition:
        op = PreconditionedOperator(op, adaptive_preconditioner(trainer.optimizer, op.params))
    dense = torch.stack([op.matvec(e) for e in torch.eye(op.dim)]).double()
    return torch.linalg.eigvalsh((dense + dense.T) / 2)[-1].item()


def test_adam_rows_carry_the_preconditioned_sharpness_against_38_over_lr() -> None:
    tracker = SharpnessTracker(3, measure_size=MEASURE, tol=1e-4, num_matvecs=60)
    trainer = _trainer(lambda m: torch.optim.Adam(m.parameters(), lr=0.01), tracker)
    trainer.fit()
    rows = tracker.rows
    assert [row["step"] for row in rows] == [3, 6, 9, 12]
    last = rows[-1]
    assert last["edge_kind"] == "adam" and last["edge"] == pytest.approx(adam_edge(0.01, 0.9)) == 3800.0
    assert last["preconditioned_lambda_max"] == pytest.approx(_dense_top(trainer, True), rel=1e-3)
    assert last["lambda_max"] == pytest.approx(_dense_top(trainer, False), rel=1e-3)
    assert last["preconditioned_lambda_max"] > 10 * last["lambda_max"]  # P = √v̂ + ε is small here: not vacuous
    assert last["lambda_over_edge"] == pytest.approx(last["preconditioned_lambda_max"] / 3800.0, rel=1e-12)
    assert rows[-1]["preconditioned_residual"] <= 1e-4 * rows[-1]["preconditioned_lambda_max"]
    record = trainer.state.history[-1]
    assert record["sharpness_preconditioned_lambda_max"] == last["preconditioned_lambda_max"]


def test_the_preconditioned_eigenvector_warm_starts_the_next_measurement() -> None:
    tracker = SharpnessTracker(1, measure_size=MEASURE, tol=1e-3, num_matvecs=60)
    trainer = _trainer(lambda m: torch.optim.Adam(m.parameters(), lr=1e-4), tracker, epochs=1)
    trainer.fit()
    cold = SharpnessTracker(1, measure_size=MEASURE, tol=1e-3, num_matvecs=60).measure(trainer, 6, 0)
    warm_matvecs = tracker.rows[-1]["matvecs"]
    assert warm_matvecs < cold["matvecs"]
    assert tracker.rows[-1]["preconditioned_lambda_max"] == pytest.approx(cold["preconditioned_lambda_max"], rel=1e-2)


def test_a_switching_policy_reports_the_edge_of_the_step_type_most_steps_took() -> None:
    """LateSAM (SAM from step 6 of 12): the first windows are ERM steps (the momentum edge), the last SAM steps."""
    tracker = SharpnessTracker(3, measure_size=MEASURE)
    make = lambda m: LateSAM(m.parameters(), torch.optim.SGD, rho=0.05, start=0.5, lr=0.05, momentum=0.9)  # noqa: E731
    trainer = _trainer(make, tracker)
    trainer.fit()
    kinds = [(row["edge_kind"], row["sam_fraction"]) for row in tracker.rows]
    assert kinds == [("momentum", 0.0), ("momentum", 0.0), ("sam+momentum", 1.0), ("sam+momentum", 1.0)]
    first, last = tracker.rows[0], tracker.rows[-1]
    assert first["edge"] == first["erm_step_edge"] == pytest.approx(momentum_edge(0.05, 0.9))
    assert first["sam_step_edge"] == pytest.approx(sam_edge(0.05, 0.05, first["grad_norm"], momentum=0.9))
    assert last["edge"] == last["sam_step_edge"] < last["erm_step_edge"]


def test_plain_sam_rows_have_no_switching_fields_and_the_state_round_trips() -> None:
    tracker = SharpnessTracker(4, measure_size=MEASURE)
    make = lambda m: SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.05)  # noqa: E731
    trainer = _trainer(make, tracker)
    trainer.fit()
    assert {row["edge_kind"] for row in tracker.rows} == {"sam"}
    assert not any("sam_fraction" in row or "preconditioned_lambda_max" in row for row in tracker.rows)
    state = tracker.state_dict()
    restored = SharpnessTracker(4)
    restored.load_state_dict(state)
    assert restored.state_dict()["rows"] == state["rows"] and restored.state_dict()["counts"] == state["counts"]
    legacy = {"rows": state["rows"], "vector": state["vector"]}  # a checkpoint written before the new fields
    restored.load_state_dict(legacy)
    assert restored.state_dict()["preconditioned_vector"] is None


def test_adam_from_the_cli_tracks_the_preconditioned_sharpness_and_the_report_plots_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--dataset", "synthetic", "--optimizer", "adam", "--lr", "0.001", "--epochs", "1"]
    args += ["--batch-size", "128", "--schedule", "constant", "--track-sharpness-every", "2", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "sharpness.jsonl").read_text().splitlines()]
    assert rows and all(row["edge_kind"] == "adam" for row in rows)
    for row in rows:
        assert row["edge"] == pytest.approx(adam_edge(0.001, 0.9))
        assert row["lambda_over_edge"] == pytest.approx(row["preconditioned_lambda_max"] / row["edge"])
    assert (out / "sharpness.png").is_file()
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["sharpness_preconditioned_lambda_max"] == rows[-1]["preconditioned_lambda_max"]


def test_the_measurement_layer_does_not_import_the_training_loop() -> None:
    """``sharpness.curvature`` loads without ``sharpness.train``; the old name of the tracker still works, with a
    DeprecationWarning (issue 16: layering)."""
    import subprocess
    import sys

    code = (
        "import sys, sharpness.curvature; "
        "assert not any(m == 'sharpness.train' or m.startswith('sharpness.train.') for m in sys.modules), "
        "sorted(m for m in sys.modules if m.startswith('sharpness'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    import sharpness.curvature

    with pytest.warns(DeprecationWarning, match="sharpness.train.tracking"):
        assert sharpness.curvature.SharpnessTracker is SharpnessTracker
