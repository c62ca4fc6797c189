"""Estimators on a real model's Hessian against the dense Hessian, and live tracking in training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from sharpness.cli import main
from sharpness.curvature import (
    HessianOperator,
    frobenius_norm,
    hutchinson_trace,
    spectral_density,
    top_eigenvalues,
)
from sharpness.curvature.edges import momentum_edge, sam_edge

F = nn.functional


@pytest.fixture(scope="module")
def model_and_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (40,), generator=gen)
    op = HessianOperator(model, F.cross_entropy, (x, y))
    dense = torch.stack([op.matvec(e) for e in torch.eye(op.dim, dtype=torch.float64)])
    return model, (x, y), dense


def test_top_and_smallest_eigenvalues_match_the_dense_hessian(model_and_hessian) -> None:
    model, data, dense = model_and_hessian
    true = torch.linalg.eigvalsh(dense)
    op = HessianOperator(model, F.cross_entropy, data)
    top = top_eigenvalues(op, k=3, tol=1e-8)
    torch.testing.assert_close(top.eigenvalues, true.flip(0)[:3], rtol=1e-4, atol=0)
    assert bool(top.converged.all()) and top.num_matvecs < op.dim
    low = top_eigenvalues(op, k=1, which="smallest", tol=1e-8)
    assert low.eigenvalues[0].item() == pytest.approx(true[0].item(), rel=1e-4)
    assert true[0] < 0  # the test exercises negative curvature


def test_trace_and_frobenius_within_their_standard_errors(model_and_hessian) -> None:
    model, data, dense = model_and_hessian
    op = HessianOperator(model, F.cross_entropy, data)
    gen = torch.Generator().manual_seed(0)
    trace = hutchinson_trace(op, num_matvecs=60, generator=gen)
    assert abs(trace.value - dense.trace().item()) <= 4 * trace.stderr
    frob = frobenius_norm(op, num_matvecs=60, generator=gen)
    assert abs(frob.value - torch.linalg.matrix_norm(dense).item()) <= 4 * frob.stderr


def test_density_integrates_to_one_and_sits_on_the_spectrum(model_and_hessian) -> None:
    model, data, dense = model_and_hessian
    op = HessianOperator(model, F.cross_entropy, data)
    density = spectral_density(op, num_probes=4, num_matvecs_per_probe=30)
    grid, values = density.grid, density.density
    assert torch.trapezoid(values, grid).item() == pytest.approx(1.0, abs=1e-3)
    true = torch.linalg.eigvalsh(dense)
    assert density.nodes.min() >= true.min() - 1e-6 and density.nodes.max() <= true.max() + 1e-6


def test_tracking_from_the_cli_measures_lambda_max_against_the_edge(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--dataset", "synthetic", "--optimizer", "sam", "--epochs", "2", "--batch-size", "64"]
    args += ["--schedule", "constant", "--track-sharpness-every", "4", "--quiet", "--out", str(out)]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "sharpness.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [4, 8, 12, 16]  # 512 examples / 64 = 8 steps per epoch
    config = json.loads((out / "config.json").read_text())
    for row in rows:  # SAM around SGD with the CLI's momentum 0.9
        assert row["edge_kind"] == "sam+momentum" and row["residual"] <= 1e-3 * abs(row["lambda_max"]) + 1e-9
        assert row["edge"] < momentum_edge(config["lr"], config["momentum"])
    assert rows[-1]["matvecs"] < rows[0]["matvecs"] or rows[-1]["matvecs"] <= 10  # warm starts are cheap
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["sharpness_lambda_max"] == rows[-1]["lambda_max"]
    lr_end = last["lr"]
    expected = sam_edge(lr_end, config["rho"], rows[-1]["grad_norm"], momentum=config["momentum"])
    assert rows[-1]["edge"] == pytest.approx(expected, rel=1e-9)
    assert rows[-1]["lambda_over_edge"] == pytest.approx(rows[-1]["lambda_max"] / expected, rel=1e-9)
    assert (out / "sharpness.png").is_file() and "Sharpness" in (out / "report.html").read_text()
    assert math.isfinite(rows[-1]["lambda_max"]) and rows[-1]["lambda_max"] > 0


def test_tracking_at_the_end_of_a_cosine_schedule_reports_an_infinite_edge(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "128", "--track-sharpness-every", "2"]
    assert main([*args, "--quiet", "--out", str(out)]) == 0
    strict = {"parse_constant": lambda name: pytest.fail(f"non-strict JSON constant {name}")}
    rows = [json.loads(line, **strict) for line in (out / "sharpness.jsonl").read_text().splitlines()]
    assert rows[-1]["edge"] is None  # infinite (lr = 0), written as null: the file is strict JSON
    assert rows[-1]["edge_kind"] == "momentum" and rows[-1]["lambda_over_edge"] == 0.0  # SGD, momentum 0.9


def test_lanczos_agrees_with_scipy_eigsh_on_the_model_operator(model_and_hessian) -> None:
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, eigsh

    model, data, _ = model_and_hessian
    op = HessianOperator(model, F.cross_entropy, data)
    scipy_op = LinearOperator(
        (op.dim, op.dim), matvec=lambda v: op.matvec(torch.from_numpy(np.ascontiguousarray(v).ravel())).numpy()
    )
    expected = np.sort(eigsh(scipy_op, k=3, which="LA", tol=1e-12)[0])[::-1]
    ours = top_eigenvalues(op, k=3, tol=1e-8).eigenvalues.numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-6)


def test_eigenvalue_criterion_reaches_the_requested_accuracy_with_fewer_products(model_and_hessian) -> None:
    model, data, dense = model_and_hessian
    true = torch.linalg.eigvalsh(dense)[-1].item()
    op = HessianOperator(model, F.cross_entropy, data)
    for tol in (1e-3, 1e-6):
        result = top_eigenvalues(op, k=1, tol=tol, criterion="eigenvalue")
        error = abs(result.eigenvalues[0].item() - true)
        assert bool(result.converged[0]) and error <= tol * abs(true)
        assert result.error_bounds[0].item() >= error - 1e-12  # the estimate bounds the actual error here
    by_eigenvalue = top_eigenvalues(op, k=1, tol=1e-3, criterion="eigenvalue")
    by_residual = top_eigenvalues(op, k=1, tol=1e-3)
    assert by_eigenvalue.num_matvecs < by_residual.num_matvecs
    with pytest.raises(ValueError, match="criterion"):
        top_eigenvalues(op, k=1, criterion="gap")  # type: ignore[arg-type]
