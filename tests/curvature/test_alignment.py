"""NTK Gram, Gauss–Newton Frobenius norm and the alignment factor μ against independent references.

The references are built here from scratch: an explicit Jacobian (``torch.autograd.functional.jacobian``), the
Gauss–Newton matrix ``G = (1/n) JᵀJ``, per-example gradients of ``l_i = ½||f(x_i) − y_i||²`` taken one example at
a time, the noise covariance ``Σ = (1/n) Σ ∇l_i ∇l_iᵀ − ∇L ∇Lᵀ`` and ``μ = Tr(ΣG) / (2L ||G||_F²)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from model_state import assert_state_unchanged, snapshot_state
from torch import nn
from torch.func import functional_call

from sharpness.curvature.alignment import alignment_factor, ntk_quantities
from sharpness.curvature.edges import sgd_frobenius_bound

F = nn.functional


def _linear(outputs: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(6, outputs).double()


def _mlp(outputs: int = 1) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, outputs)).double()


def _data(n: int, inputs: int, outputs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inputs, generator=gen, dtype=torch.float64)
    y = torch.randn(n, outputs, generator=gen, dtype=torch.float64)
    return x, (y.squeeze(1) if outputs == 1 else y)


def _flat_function(model: nn.Module, names: list[str]):
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def weights(w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: c.view(s) for n, c, s in zip(names, w.split([s.numel() for s in shapes]), shapes, strict=True)}

    return flat, weights


def _references(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str] | None = None) -> dict:
    """Explicit J, G = JᵀJ/n, L, and μ from per-example gradients, with the (1/2n) Σ ||r_i||² loss."""
    names = names or [n for n, _ in model.named_parameters()]
    flat, weights = _flat_function(model, names)
    n = len(x)

    def f(w: torch.Tensor) -> torch.Tensor:
        return functional_call(model, weights(w), (x,)).reshape(n, -1)

    jac = torch.autograd.functional.jacobian(f, flat)  # (n, k, d)
    J = jac.reshape(-1, flat.numel())  # noqa: N806
    G = J.T @ J / n  # noqa: N806
    targets = y.reshape(n, -1)

    def example_loss(w: torch.Tensor, i: int) -> torch.Tensor:
        out = functional_call(model, weights(w), (x[i : i + 1],)).reshape(1, -1)
        return 0.5 * ((out - targets[i : i + 1]) ** 2).sum()

    per_example = []
    losses = []
    for i in range(n):
        w = flat.clone().requires_grad_(True)
        loss_i = example_loss(w, i)
        (grad_i,) = torch.autograd.grad(loss_i, w)
        per_example.append(grad_i)
        losses.append(float(loss_i.detach()))
    grads = torch.stack(per_example)  # (n, d)
    mean_grad = grads.mean(0)
    sigma = grads.T @ grads / n - torch.outer(mean_grad, mean_grad)
    loss = sum(losses) / n
    mu = float(torch.trace(sigma @ G) / (2 * loss * (G * G).sum()))
    return {"J": J, "G": G, "loss": loss, "mu": mu, "mean_grad": mean_grad, "flat": flat, "weights": weights}


CASES = [
    pytest.param(_linear, 6, 1, id="linear"),
    pytest.param(_mlp, 3, 1, id="tanh-mlp"),
    pytest.param(_mlp, 3, 2, id="tanh-mlp-2-outputs"),
    pytest.param(_linear, 6, 3, id="linear-3-outputs"),
]


@pytest.mark.parametrize(("make", "inputs", "outputs"), CASES)
def test_gram_frobenius_and_mu_match_their_definitions(make, inputs: int, outputs: int) -> None:
    model = make(outputs)
    x, y = _data(9, inputs, outputs, seed=2)
    q = ntk_quantities(model, x, y)
    ref = _references(model, x, y)
    n, k = 9, outputs
    assert (q.num_examples, q.num_outputs) == (n, k) and q.gram.shape == (n * k, n * k)
    torch.testing.assert_close(q.gram, ref["J"] @ ref["J"].T, rtol=1e-12, atol=1e-12)
    # ||G||_F = ||JᵀJ||_F / n = ||JJᵀ||_F / n: the two products share their non-zero eigenvalues.
    g_frob = float(torch.linalg.matrix_norm(ref["G"]))
    assert q.hessian_frobenius == pytest.approx(g_frob, rel=1e-12)
    assert q.hessian_frobenius == pytest.approx(float(torch.linalg.matrix_norm(q.gram)) / n, rel=1e-14)
    residuals = (model(x).reshape(n, -1) - y.reshape(n, -1)).reshape(-1).detach()
    torch.testing.assert_close(q.residuals, residuals, rtol=0, atol=0)
    assert q.loss == pytest.approx(ref["loss"], rel=1e-12)
    assert q.loss == pytest.approx(
        float(F.mse_loss(model(x).reshape(n, -1), y.reshape(n, -1), reduction="sum").detach()) / (2 * n)
    )
    # the loss convention: ∇L = (1/n) Jᵀ r is the mean per-example gradient
    torch.testing.assert_close(ref["J"].T @ q.residuals / n, ref["mean_grad"], rtol=1e-10, atol=1e-12)
    assert q.mu == pytest.approx(ref["mu"], rel=1e-9)
    assert 0.0 < q.mu < math.inf
    assert alignment_factor(q.gram, q.residuals, n) == q.mu


def test_papers_scalar_formula_is_the_k1_case() -> None:
    model = _mlp(1)
    x, y = _data(11, 3, 1, seed=3)
    q = ntk_quantities(model, x, y)
    K, r, n = q.gram, q.residuals, 11  # noqa: N806
    K2 = K @ K  # noqa: N806
    papers = (n * (r**2 * torch.diagonal(K2)).sum() - r @ K2 @ r) / ((r @ r) * (K * K).sum())
    assert q.mu == pytest.approx(float(papers), rel=1e-12)


def test_vector_outputs_are_not_independent_scalar_examples() -> None:
    """For k > 1 the noise samples examples (all outputs together): the per-coordinate formula differs."""
    model = _mlp(2)
    x, y = _data(8, 3, 2, seed=4)
    q = ntk_quantities(model, x, y)
    K, r, rows = q.gram, q.residuals, 16  # noqa: N806
    K2 = K @ K  # noqa: N806
    per_coordinate = (rows * (r**2 * torch.diagonal(K2)).sum() - r @ K2 @ r) / ((r @ r) * (K * K).sum())
    assert abs(q.mu - float(per_coordinate)) > 1e-3


@pytest.mark.parametrize("outputs", [1, 2])
def test_at_interpolation_the_frobenius_norm_is_the_hessians(outputs: int) -> None:
    model = _mlp(outputs)
    x, _ = _data(7, 3, outputs, seed=5)
    y = model(x).detach().squeeze(-1) if outputs == 1 else model(x).detach()  # r = 0 exactly: H = G
    q = ntk_quantities(model, x, y)
    names = [n for n, _ in model.named_parameters()]
    flat, weights = _flat_function(model, names)

    def loss(w: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, weights(w), (x,)).reshape(7, -1)
        return ((out - y.reshape(7, -1)) ** 2).sum() / (2 * 7)

    hessian = torch.autograd.functional.hessian(loss, flat)
    assert q.hessian_frobenius == pytest.approx(float(torch.linalg.matrix_norm(hessian)), rel=1e-10)
    assert q.loss == 0.0 and math.isnan(q.mu)
    # the F.mse_loss convention (mean over n k entries, no ½) is (2/k) L: its Hessian is (2/k) H
    mse_hessian = torch.autograd.functional.hessian(
        lambda w: F.mse_loss(functional_call(model, weights(w), (x,)).reshape(7, -1), y.reshape(7, -1)), flat
    )
    assert float(torch.linalg.matrix_norm(mse_hessian)) == pytest.approx(2 / outputs * q.hessian_frobenius, rel=1e-10)


def test_mu_is_invariant_to_the_residual_scale_and_feeds_the_stability_bound() -> None:
    model = _linear(1)
    x, y = _data(10, 6, 1, seed=6)
    q = ntk_quantities(model, x, y)
    out = model(x).detach().squeeze(1)
    scaled = ntk_quantities(model, x, out + 3.0 * (y - out))  # r → 3 r, the same K
    torch.testing.assert_close(scaled.residuals, 3.0 * q.residuals)
    assert scaled.mu == pytest.approx(q.mu, rel=1e-12)
    torch.testing.assert_close(scaled.gram, q.gram, rtol=0, atol=0)
    bound = sgd_frobenius_bound(0.1, 4, q.mu)
    assert bound == pytest.approx(math.sqrt(4 / q.mu) / 0.1)


def test_parameter_filter_restricts_the_jacobian() -> None:
    model = _mlp(2)
    x, y = _data(6, 3, 2, seed=7)
    q = ntk_quantities(model, x, y, params=["2"])
    ref = _references(model, x, y, names=["2.weight", "2.bias"])
    torch.testing.assert_close(q.gram, ref["J"] @ ref["J"].T, rtol=1e-12, atol=1e-12)
    assert q.mu == pytest.approx(ref["mu"], rel=1e-9)
    assert q.hessian_frobenius == pytest.approx(float(torch.linalg.matrix_norm(ref["G"])), rel=1e-12)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_model_state_is_untouched(mode: str) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 2)).double()
    x, y = _data(8, 3, 2, seed=8)
    F.mse_loss(model(x), y).backward()  # gradients and running statistics that must survive
    model[1].eval()
    before = snapshot_state(model)
    q = ntk_quantities(model, x, y, mode=mode)
    assert_state_unchanged(model, before)
    assert math.isfinite(q.mu) and q.hessian_frobenius > 0
    again = ntk_quantities(model, x, y, mode=mode)  # deterministic: dropout is off
    torch.testing.assert_close(again.gram, q.gram, rtol=0, atol=0)


def test_bad_arguments() -> None:
    model = _mlp(2)
    x, y = _data(5, 3, 2, seed=9)
    with pytest.raises(ValueError, match="y has"):
        ntk_quantities(model, x, y[:, :1])
    with pytest.raises(ValueError, match="different numbers"):
        ntk_quantities(model, x, y[:4])
    with pytest.raises(ValueError, match="mode"):
        ntk_quantities(model, x, y, mode="test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_examples"):
        alignment_factor(torch.eye(4), torch.ones(4), 0)
    with pytest.raises(ValueError, match="gram"):
        alignment_factor(torch.eye(4), torch.ones(3), 1)
