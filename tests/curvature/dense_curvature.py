"""Test helper: dense Hessian, generalised Gauss–Newton and empirical Fisher matrices, built independently of the
operators with ``torch.autograd.functional`` on a copy of the model (explicit Jacobians, explicit output Hessians,
per-example gradients in a Python loop)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

F = nn.functional
Batches = Sequence[tuple[Tensor, Tensor]]


def mlp(batchnorm: bool = False, dropout: bool = False, seed: int = 0) -> nn.Module:
    """Linear(5, 7) [BatchNorm1d] Tanh [Dropout] Linear(7, 3) in float64."""
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 7)] + ([nn.BatchNorm1d(7)] if batchnorm else []) + [nn.Tanh()]
    layers += [nn.Dropout(0.3)] if dropout else []
    return nn.Sequential(*layers, nn.Linear(7, 3)).double()


def batches(sizes: Sequence[int], loss: str = "cross_entropy", seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    """Batches of the given sizes: 5 features; class targets in {0, 1, 2} or real targets of shape (n, 3)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
        if loss == "cross_entropy":
            y = torch.randint(0, 3, (n,), generator=gen)
        else:
            y = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        out.append((x, y))
    return out


def _reference_model(model: nn.Module, train: bool) -> nn.Module:
    """A copy in the measurement mode: train (dropout off, BatchNorm on batch statistics, no updates) or eval."""
    model = copy.deepcopy(model)
    model.train(train)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
        if isinstance(module, nn.BatchNorm1d):
            module.track_running_stats = not train and module.track_running_stats
    return model


def flat_network(
    model: nn.Module, names: list[str], x: Tensor, train: bool
) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """``w ↦ model(x)`` as a function of the flat selected weights (the others fixed), and the current ``w``."""
    model = _reference_model(model, train)
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]

    def network(w: Tensor) -> Tensor:
        chunks = w.split([s.numel() for s in shapes])
        weights = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return functional_call(model, weights, (x,))

    return network, torch.cat([params[n].detach().reshape(-1) for n in names])


def output_hessian(loss: str, outputs: Tensor) -> Tensor:
    """The explicit ``(n·C, n·C)`` Hessian of the mean loss w.r.t. the flat outputs: ``diag(p) − p pᵀ`` per example
    over ``n`` for cross-entropy, ``2/(n·C) I`` for the mean square loss."""
    n, c = outputs.shape
    if loss == "mse_loss":
        return torch.eye(n * c, dtype=outputs.dtype) * (2.0 / (n * c))
    p = torch.softmax(outputs, dim=1)
    return torch.block_diag(*[torch.diag(pi) - torch.outer(pi, pi) for pi in p]) / n


def dense_ggn(model: nn.Module, loss: str, data: Batches, names: list[str], train: bool = False) -> Tensor:
    """``Σ_b (n_b/N) J_bᵀ H_out,b J_b``, ``J_b`` from ``torch.autograd.functional.jacobian`` of the outputs."""
    total = sum(len(y) for _, y in data)
    result = 0
    for x, _ in data:
        network, w = flat_network(model, names, x, train)
        outputs = network(w).detach()
        jacobian = torch.autograd.functional.jacobian(network, w).reshape(outputs.numel(), -1)
        result = result + len(x) / total * jacobian.T @ output_hessian(loss, outputs) @ jacobian
    return result


def dense_empirical_fisher(model: nn.Module, loss: str, data: Batches, names: list[str], train: bool = False) -> Tensor:
    """``(1/N) Σ_i g_i g_iᵀ``, ``g_i`` the gradient of example ``i``'s loss term (its output row of the batch's
    forward, as a batch of one), one example at a time."""
    loss_fn = getattr(F, loss)
    gradients = []
    for x, y in data:
        network, w = flat_network(model, names, x, train)
        for i in range(len(x)):
            term = lambda v, i=i: loss_fn(network(v)[i : i + 1], y[i : i + 1])  # noqa: E731
            gradients.append(torch.autograd.functional.jacobian(term, w))
    g = torch.stack(gradients)
    return g.T @ g / len(g)


def dense_hessian(model: nn.Module, loss: str, data: Batches, names: list[str], train: bool = False) -> Tensor:
    """``Σ_b (n_b/N) ∇²L_b`` with ``torch.autograd.functional.hessian`` of a functional_call loss."""
    loss_fn = getattr(F, loss)
    total = sum(len(y) for _, y in data)
    result = 0
    for x, y in data:
        network, w = flat_network(model, names, x, train)
        result = result + len(x) / total * torch.autograd.functional.hessian(lambda v: loss_fn(network(v), y), w)
    return result


def operator_matrix(op) -> Tensor:
    """The operator's matrix, ``op.matmat`` of the identity (``test_matmat.py`` checks it against ``matvec``)."""
    return op.matmat(torch.eye(op.dim, dtype=op.dtype))


def names_of(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]
