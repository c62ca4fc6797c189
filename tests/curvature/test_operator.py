"""The Hessian operator against the dense Hessian, and the model left exactly as found."""

from __future__ import annotations

import pytest
import torch
from model_state import assert_state_unchanged, snapshot_state
from torch import nn
from torch.func import functional_call

from sharpness.curvature.operator import HessianOperator, select_parameters
from sharpness.curvature.state import measurement_mode

F = nn.functional


def _model(batchnorm: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(4, 5)] + ([nn.BatchNorm1d(5)] if batchnorm else []) + [nn.Tanh(), nn.Dropout(0.5)]
    return nn.Sequential(*layers, nn.Linear(5, 3)).double()


def _data(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def _dense_hessian(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str], train: bool, loss_fn=F.cross_entropy
) -> torch.Tensor:
    """Reference: torch.autograd.functional.hessian of the loss as a function of the flat selected weights."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    model.train(train)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()

    def loss(w: torch.Tensor) -> torch.Tensor:
        chunks = w.split([s.numel() for s in shapes])
        weights = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        buffers = {k: v.clone() for k, v in model.named_buffers()}  # leave the running statistics alone
        return loss_fn(functional_call(model, {**weights, **buffers}, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat)


def _operator_matrix(op: HessianOperator) -> torch.Tensor:
    return torch.stack([op.matvec(e) for e in torch.eye(op.dim, dtype=op.dtype)])


@pytest.mark.parametrize("backend", ["double_backward", "forward_over_reverse"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("loss_name", ["cross_entropy", "mse_loss"])
def test_matvec_equals_the_dense_hessian(backend: str, mode: str, loss_name: str) -> None:
    loss_fn = getattr(F, loss_name)
    model = _model()
    x, y = _data(24, 1)
    if loss_name == "mse_loss":  # real-valued targets (forward-over-reverse once failed on them)
        y = F.one_hot(y, 3).double()
    op = HessianOperator(model, loss_fn, (x, y), backend=backend, mode=mode)
    names = [n for n, _ in model.named_parameters()]
    reference = _dense_hessian(_model(), x, y, names, train=mode == "train", loss_fn=loss_fn)
    torch.testing.assert_close(_operator_matrix(op), reference, rtol=1e-10, atol=1e-12)
    assert op.num_matvecs == op.dim


def test_measurement_set_of_batches_is_the_mean_over_all_examples() -> None:
    model = _model(batchnorm=False)
    (x1, y1), (x2, y2) = _data(10, 1), _data(30, 2)
    op = HessianOperator(model, F.cross_entropy, [(x1, y1), (x2, y2)])
    whole = HessianOperator(model, F.cross_entropy, (torch.cat([x1, x2]), torch.cat([y1, y2])))
    torch.testing.assert_close(_operator_matrix(op), _operator_matrix(whole), rtol=1e-10, atol=1e-12)
    loss, grad = op.loss_and_gradient()
    whole_loss, whole_grad = whole.loss_and_gradient()
    assert loss == pytest.approx(whole_loss) and torch.allclose(grad, whole_grad)


def test_parameter_filter_gives_the_diagonal_block() -> None:
    model = _model(batchnorm=False)
    x, y = _data(16, 3)
    names = [n for n, _ in model.named_parameters()]
    full = _dense_hessian(_model(batchnorm=False), x, y, names, train=False)
    sizes = [p.numel() for p in model.parameters()]
    start = sum(sizes[:2])  # the last layer: "3.weight", "3.bias"
    op = HessianOperator(model, F.cross_entropy, (x, y), params=["3"])
    assert [n for n, _ in op.named_params] == ["3.weight", "3.bias"]
    torch.testing.assert_close(_operator_matrix(op), full[start:, start:], rtol=1e-10, atol=1e-12)
    by_predicate = select_parameters(model, lambda name, p: p.ndim == 1)
    assert [n for n, _ in by_predicate] == ["0.bias", "3.bias"]
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        select_parameters(model, ["layer9"])


@pytest.mark.parametrize("backend", ["double_backward", "forward_over_reverse"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_model_state_is_untouched(backend: str, mode: str) -> None:
    model = _model()
    x, y = _data(12, 4)
    F.cross_entropy(model(x), y).backward()  # existing gradients must survive
    model[1].eval()  # mixed modes must survive too
    before = snapshot_state(model)
    op = HessianOperator(model, F.cross_entropy, (x, y), backend=backend, mode=mode)
    op.matvec(torch.ones(op.dim, dtype=torch.float64))
    op.loss_and_gradient()
    assert_state_unchanged(model, before)


def test_model_state_is_restored_when_the_measurement_raises() -> None:
    model = _model()
    x, y = _data(12, 5)
    before = snapshot_state(model)
    calls = []

    def exploding_loss(outputs, targets):
        calls.append(1)
        raise RuntimeError("loss failed")

    op = HessianOperator(model, exploding_loss, (x, y), mode="train")
    with pytest.raises(RuntimeError, match="loss failed"):
        op.matvec(torch.ones(op.dim, dtype=torch.float64))
    assert calls
    assert_state_unchanged(model, before)


def test_train_mode_keeps_dropout_off_and_eval_mode_uses_running_statistics() -> None:
    model = _model()
    x, y = _data(12, 6)
    for _ in range(3):
        model(x + 1.0)  # move the running statistics away from the batch statistics
    model.eval()
    eval_op = HessianOperator(model, F.cross_entropy, (x, y), mode="eval")
    train_op = HessianOperator(model, F.cross_entropy, (x, y), mode="train")
    v = torch.ones(eval_op.dim, dtype=torch.float64)
    assert torch.equal(train_op.matvec(v), train_op.matvec(v))  # deterministic: dropout is off
    assert not torch.allclose(eval_op.matvec(v), train_op.matvec(v))  # BN: running vs batch statistics
    with measurement_mode(model, "train"):
        assert model.training and not model[3].training
    with pytest.raises(ValueError, match="mode"):
        with measurement_mode(model, "inference"):  # type: ignore[arg-type]
            pass


def test_bad_arguments() -> None:
    model = _model()
    data = _data(4, 7)
    with pytest.raises(ValueError, match="backend"):
        HessianOperator(model, F.cross_entropy, data, backend="finite_differences")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        HessianOperator(model, F.cross_entropy, data, mode="test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        HessianOperator(model, F.cross_entropy, [])
    op = HessianOperator(model, F.cross_entropy, data)
    with pytest.raises(ValueError, match="flat vector"):
        op.matvec(torch.ones(3, dtype=torch.float64))


def test_cached_graph_gives_the_same_products_and_refuses_changed_weights() -> None:
    model = _model()
    x, y = _data(16, 8)
    cached = HessianOperator(model, F.cross_entropy, (x, y), cache_graph=True)
    fresh = HessianOperator(model, F.cross_entropy, (x, y), cache_graph=False)
    torch.testing.assert_close(_operator_matrix(cached), _operator_matrix(fresh), rtol=1e-12, atol=1e-14)
    assert cached.loss_and_gradient()[0] == pytest.approx(fresh.loss_and_gradient()[0])
    with torch.no_grad():
        model[-1].weight.add_(0.1)  # saved by the graph (needed for the gradients of earlier layers)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        cached.matvec(torch.ones(cached.dim, dtype=torch.float64))
    fresh.matvec(torch.ones(fresh.dim, dtype=torch.float64))  # an uncached operator follows the new weights


# --- a trainable parameter the loss does not use, and F.mse_loss -------------------------------------------


class _WithUnusedLayer(nn.Module):
    """Two used layers around one that ``forward`` never calls (its Hessian rows and columns are zero)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(4, 5)
        self.unused = nn.Linear(3, 2)
        self.last = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.tanh(self.first(x)))


def _targets(loss_name: str, x: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    if loss_name == "cross_entropy":
        return torch.randint(0, 3, (len(x),), generator=gen)
    return torch.randn(len(x), 3, generator=gen, dtype=torch.float64)


def _flat_loss(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, names: list[str]):
    """The loss as a function of the flat selected weights (the others fixed), evaluated on a copy of ``model``."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]

    def loss(w: torch.Tensor) -> torch.Tensor:
        chunks = w.split([s.numel() for s in shapes])
        weights = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return loss_fn(functional_call(model, weights, (x,)), y)

    return loss, torch.cat([params[n].detach().reshape(-1) for n in names])


def _offsets(model: nn.Module, names: list[str], name: str) -> slice:
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    start = sum(sizes[n] for n in names[: names.index(name)])
    return slice(start, start + sizes[name])


@pytest.mark.parametrize("backend", ["double_backward", "forward_over_reverse"])
@pytest.mark.parametrize("loss_name", ["cross_entropy", "mse_loss"])
def test_unused_parameter_has_zero_gradient_and_zero_hessian_rows(backend: str, loss_name: str) -> None:
    loss_fn = getattr(F, loss_name)
    model = _WithUnusedLayer().double()
    x = _data(20, 12)[0]
    y = _targets(loss_name, x)
    loss_fn(model(x), y).backward()  # existing gradients (and None for the unused layer) must survive
    before = snapshot_state(model)
    names = [n for n, _ in model.named_parameters()]
    loss, flat = _flat_loss(_WithUnusedLayer().double(), loss_fn, x, y, names)
    reference = torch.autograd.functional.hessian(loss, flat)

    op = HessianOperator(model, loss_fn, (x, y), backend=backend)
    matrix = _operator_matrix(op)
    value, gradient = op.loss_and_gradient()

    torch.testing.assert_close(matrix, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gradient, torch.autograd.functional.jacobian(loss, flat), rtol=1e-10, atol=1e-12)
    assert value == pytest.approx(float(loss(flat)), rel=1e-12)
    for name in ("unused.weight", "unused.bias"):
        block = _offsets(model, names, name)
        assert not matrix[block].any() and not matrix[:, block].any() and not gradient[block].any()
    assert model.training
    assert_state_unchanged(model, before)


@pytest.mark.parametrize("backend", ["double_backward", "forward_over_reverse"])
def test_parameter_filter_with_an_unused_parameter(backend: str) -> None:
    model = _WithUnusedLayer().double()
    x = _data(16, 13)[0]
    y = _targets("mse_loss", x)
    before = snapshot_state(model)
    names = ["unused.weight", "unused.bias", "last.weight", "last.bias"]  # in named_parameters order
    loss, flat = _flat_loss(_WithUnusedLayer().double(), F.mse_loss, x, y, names)

    op = HessianOperator(model, F.mse_loss, (x, y), params=["unused", "last"], backend=backend)
    assert [n for n, _ in op.named_params] == names
    torch.testing.assert_close(
        _operator_matrix(op), torch.autograd.functional.hessian(loss, flat), rtol=1e-10, atol=1e-12
    )
    assert not op.loss_and_gradient()[1][:8].any()

    only_unused = HessianOperator(model, F.mse_loss, (x, y), params=["unused"], backend=backend)
    assert not _operator_matrix(only_unused).any() and not only_unused.loss_and_gradient()[1].any()
    assert_state_unchanged(model, before)
