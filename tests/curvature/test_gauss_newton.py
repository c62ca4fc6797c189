"""The generalised Gauss–Newton and empirical Fisher operators against dense matrices built in the test."""

from __future__ import annotations

import pytest
import torch
from dense_curvature import (
    batches,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    flat_network,
    mlp,
    names_of,
    operator_matrix,
)
from hypothesis import given
from hypothesis import strategies as st
from model_state import assert_state_unchanged, snapshot_state
from torch import nn

from sharpness.curvature import EmpiricalFisherOperator, GGNOperator, HessianOperator
from sharpness.curvature.gauss_newton import identify_loss

F = nn.functional
SIZES = (4, 7, 5)  # unequal batches: the products weight them by their example counts
CPU = torch.device("cpu")
OPERATORS = {"ggn": (GGNOperator, dense_ggn), "fisher": (EmpiricalFisherOperator, dense_empirical_fisher)}


@pytest.mark.parametrize("kind", ["ggn", "fisher"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse_loss"])
def test_operator_equals_the_dense_matrix(kind: str, mode: str, loss: str) -> None:
    operator, dense = OPERATORS[kind]
    model = mlp(batchnorm=True, dropout=True)
    for _ in range(2):
        model(batches([16], seed=9)[0][0] + 1.0)  # running statistics away from the batch statistics
    data = batches(SIZES, loss)
    op = operator(model, getattr(F, loss), data, mode=mode)
    reference = dense(model, loss, data, names_of(model), train=mode == "train")
    torch.testing.assert_close(operator_matrix(op), reference, rtol=1e-10, atol=1e-12)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), reference @ v, rtol=1e-10, atol=1e-12)
    assert op.num_matvecs == op.dim + 1
    assert (op.dim, op.dtype, op.device) == (sum(p.numel() for p in model.parameters()), torch.float64, CPU)


@pytest.mark.parametrize("kind", ["ggn", "fisher"])
def test_parameter_filter_gives_the_diagonal_block(kind: str) -> None:
    operator, dense = OPERATORS[kind]
    model = mlp()
    data = batches(SIZES)
    full = dense(model, "cross_entropy", data, names_of(model))
    op = operator(model, F.cross_entropy, data, params=["2"])  # the last layer: "2.weight", "2.bias"
    assert [n for n, _ in op.named_params] == ["2.weight", "2.bias"]
    torch.testing.assert_close(operator_matrix(op), full[-op.dim :, -op.dim :], rtol=1e-10, atol=1e-12)
    biases = operator(model, F.cross_entropy, data, params=lambda name, p: p.ndim == 1)
    reference = dense(model, "cross_entropy", data, ["0.bias", "2.bias"])
    torch.testing.assert_close(operator_matrix(biases), reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["ggn", "fisher"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_model_and_gradients_are_left_as_found(kind: str, mode: str) -> None:
    operator, _ = OPERATORS[kind]
    model = mlp(batchnorm=True, dropout=True)
    data = batches(SIZES)
    F.cross_entropy(model(data[0][0]), data[0][1]).backward()  # existing gradients must survive
    model[1].eval()  # and mixed modes
    before = snapshot_state(model)
    op = operator(model, F.cross_entropy, data, mode=mode)
    op.matvec(torch.ones(op.dim, dtype=torch.float64))
    op.matmat(torch.ones(op.dim, 3, dtype=torch.float64))
    op.loss_and_gradient()
    assert_state_unchanged(model, before)


def test_ggn_is_psd_and_the_hessian_is_not() -> None:
    model = mlp()
    data = batches(SIZES)
    ggn = operator_matrix(GGNOperator(model, F.cross_entropy, data))
    hessian = operator_matrix(HessianOperator(model, F.cross_entropy, data))
    assert torch.linalg.eigvalsh(ggn).min() > -1e-12
    assert torch.linalg.eigvalsh(hessian).min() < -1e-6  # the residual term carries negative curvature here
    torch.testing.assert_close(hessian, dense_hessian(model, "cross_entropy", data, names_of(model)))


def test_ggn_equals_the_hessian_for_a_linear_model_with_the_square_loss() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    data = batches(SIZES, "mse_loss")
    ggn = operator_matrix(GGNOperator(model, nn.MSELoss(), data))
    torch.testing.assert_close(ggn, operator_matrix(HessianOperator(model, F.mse_loss, data)), rtol=1e-10, atol=1e-13)


def test_at_an_interpolating_minimum_the_ggn_is_the_hessian_and_the_empirical_fisher_vanishes() -> None:
    model = mlp()
    x = batches([9], "mse_loss")[0][0]
    with torch.no_grad():
        y = model(x)  # zero residuals
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    ggn = operator_matrix(GGNOperator(model, F.mse_loss, data))
    torch.testing.assert_close(ggn, operator_matrix(HessianOperator(model, F.mse_loss, data)), rtol=1e-9, atol=1e-13)
    assert ggn.abs().max() > 1e-3
    assert operator_matrix(EmpiricalFisherOperator(model, F.mse_loss, data)).abs().max() < 1e-25


def test_ggn_of_cross_entropy_is_the_true_fisher() -> None:
    """Martens (2020): ``(1/N) Σ_i E_{c ~ p(·|x_i)} ∇log p_c ∇log p_cᵀ``, labels drawn from the model."""
    model = mlp()
    data = batches((6, 3))
    names = names_of(model)
    rows, total = [], sum(len(y) for _, y in data)
    for x, _ in data:
        network, w = flat_network(model, names, x, train=False)
        probabilities = torch.softmax(network(w), dim=1).detach()
        for i in range(len(x)):
            for c in range(3):
                score = torch.autograd.functional.jacobian(lambda v, i=i, c=c: network(v).log_softmax(1)[i, c], w)
                rows.append(probabilities[i, c].sqrt() * score)
    fisher = torch.stack(rows).T @ torch.stack(rows) / total
    torch.testing.assert_close(operator_matrix(GGNOperator(model, F.cross_entropy, data)), fisher)


# ------------------------------------------------------------------ the loss: closed forms and the generic path


def test_loss_identification() -> None:
    assert identify_loss(F.cross_entropy) == identify_loss(nn.CrossEntropyLoss(label_smoothing=0.1)) == "cross_entropy"
    assert identify_loss(F.mse_loss) == identify_loss(nn.MSELoss()) == "mse"
    assert identify_loss(nn.CrossEntropyLoss(weight=torch.ones(3))) == "generic"
    assert identify_loss(lambda out, y: F.cross_entropy(out, y)) == "generic"
    assert identify_loss(lambda out, y: F.cross_entropy(out, y), "cross_entropy") == "cross_entropy"
    with pytest.raises(ValueError, match="reduction='mean'"):
        identify_loss(nn.MSELoss(reduction="sum"))
    with pytest.raises(ValueError, match="class weights"):
        identify_loss(nn.CrossEntropyLoss(weight=torch.ones(3)), "cross_entropy")
    with pytest.raises(ValueError, match="loss must be one of"):
        identify_loss(F.mse_loss, "huber")  # type: ignore[arg-type]


def _soft_targets(n: int) -> torch.Tensor:
    return torch.softmax(torch.randn(n, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64), 1)


@pytest.mark.filterwarnings("ignore:Using a target size:UserWarning")  # the broadcasting case, on purpose
@pytest.mark.parametrize(
    ("loss_fn", "targets", "kind"),
    [
        (nn.CrossEntropyLoss(ignore_index=1, label_smoothing=0.2), None, "cross_entropy"),  # some ignored targets
        (nn.CrossEntropyLoss(label_smoothing=0.2), "soft", "cross_entropy"),
        (F.cross_entropy, "soft", "cross_entropy"),
        (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)), None, "generic"),
        (F.mse_loss, "broadcast", "mse"),  # targets (n, 1) against outputs (n, 3): the generic path
        (lambda out, y: F.huber_loss(out, y, delta=0.5), "soft", "generic"),
    ],
)
def test_closed_forms_and_generic_path_match_autograd(loss_fn, targets, kind: str) -> None:
    model = mlp()
    data = batches(SIZES)
    if targets is not None:
        make = {"soft": _soft_targets, "broadcast": lambda n: _soft_targets(n)[:, :1]}[targets]
        data = [(x, make(len(x))) for x, _ in data]
    op = GGNOperator(model, loss_fn, data)
    assert op.loss == kind
    reference = 0
    names, total = names_of(model), sum(len(x) for x, _ in data)
    for x, y in data:
        network, w = flat_network(model, names, x, train=False)
        outputs = network(w).detach()
        jacobian = torch.autograd.functional.jacobian(network, w).reshape(outputs.numel(), -1)
        h_out = torch.autograd.functional.hessian(lambda o, y=y: loss_fn(o, y), outputs).reshape(len(jacobian), -1)
        reference = reference + len(x) / total * jacobian.T @ h_out @ jacobian
    torch.testing.assert_close(operator_matrix(op), reference, rtol=1e-10, atol=1e-12)


def test_bad_arguments() -> None:
    model = mlp()
    data = batches([4])
    with pytest.raises(ValueError, match="mode must be"):
        GGNOperator(model, F.cross_entropy, data, mode="test")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        EmpiricalFisherOperator(model, "cross_entropy", data)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss must be one of"):
        GGNOperator(model, F.cross_entropy, data, loss="nll")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        GGNOperator(model, F.cross_entropy, data, params=lambda name, p: False)
    op = GGNOperator(model, F.cross_entropy, data)
    with pytest.raises(ValueError, match="flat vector"):
        op.matvec(torch.ones(3, dtype=torch.float64))


# ------------------------------------------------------------------ invariants (hypothesis)


@given(
    kind=st.sampled_from(["ggn", "fisher"]),
    loss=st.sampled_from(["cross_entropy", "mse_loss"]),
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_operators_are_symmetric_and_psd(kind: str, loss: str, sizes: list[int], seed: int) -> None:
    """``uᵀAv = vᵀAu`` and ``vᵀAv ≥ 0`` for random models, batches and vectors."""
    model = mlp(seed=seed)
    op = OPERATORS[kind][0](model, getattr(F, loss), batches(sizes, loss, seed=seed))
    uv = torch.randn(op.dim, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    product = op.matmat(uv)
    gram = uv.T @ product
    scale = product.abs().max() * uv.abs().max() * op.dim
    assert abs(gram[0, 1] - gram[1, 0]) <= 1e-12 * scale
    assert gram[0, 0] >= -1e-12 * scale and gram[1, 1] >= -1e-12 * scale
