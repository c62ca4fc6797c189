"""Gauss–Newton and empirical Fisher operators of a model's loss on a measurement set (matrix-free, PSD).

With ``f_b(w)`` the network's outputs on batch ``b`` (``n_b`` examples), ``L_b(f) = loss_fn(f, y_b)`` the batch's
mean loss, ``J_b = ∂f_b/∂w`` (w.r.t. the selected parameters) and ``N = Σ_b n_b``:

- **Generalised Gauss–Newton** (Schraudolph 2002; Martens 2020, "New insights and perspectives on the natural
  gradient method"): ``G = Σ_b (n_b/N) J_bᵀ H_b J_b`` with ``H_b = ∇²_f L_b`` the Hessian of the loss w.r.t. the
  outputs. It is the Hessian ``H = G + Σ_b (n_b/N) Σ_j (∂L_b/∂f_j) ∇²_w f_j`` without the term that carries the
  network's own second derivatives: ``G = H`` for a network linear in ``w`` and, for the square loss, at an
  interpolating minimum (zero residuals). For cross-entropy (softmax outputs, an exponential family with its
  canonical link) ``G`` is the true Fisher information of the model's predictive distribution (Martens 2020).
- **Empirical Fisher** ``F = (1/N) Σ_i g_i g_iᵀ``, ``g_i = ∇_w ℓ_i`` the gradient of example ``i``'s loss
  ``ℓ_i = loss_fn(f_i, y_i)`` (``loss_fn`` on a batch of one) at the OBSERVED label ``y_i``. The true Fisher
  takes the expectation over labels drawn from the model, ``ŷ ~ p(·|x_i)``; the empirical Fisher does not, and
  Kunstner, Balles & Hennig (2019, "Limitations of the empirical Fisher approximation for natural gradient
  descent") show that it is in general a poor approximation of the Fisher and of the Hessian: it coincides
  with them only when the model's distribution matches the data's (a well-specified model at its optimum, in
  the large-data limit); for the square loss ``g_i = J_iᵀ ∇_f ℓ_i`` scales with the residual, so ``F → 0`` at an
  interpolating minimum while ``G`` does not; preconditioning with it can distort the update badly. It is the
  uncentred second moment of the per-example gradients, ``F = Σ + ∇L ∇Lᵀ`` with ``Σ`` the covariance of SGD's
  gradient noise, and that is what it measures well (:mod:`~sharpness.curvature.alignment`).

Both are positive semi-definite when the loss is convex in the outputs (cross-entropy, square loss; ``F``
always). That helps: ``λ_max = ‖A‖₂``, so power iteration and Lanczos cannot be drawn to a large negative
eigenvalue and the spectrum lies in ``[0, λ_max]``; a Rademacher Hutchinson probe has variance at most
``2‖A‖_F² ≤ 2 Tr(A)²``, a relative error bounded whatever the matrix, and Hutch++'s ``(1 ± ε)`` guarantee is for
PSD matrices; and near a minimum ``λ_max(G) ≈ λ_max(H)`` (the residual term vanishes as the loss is fitted), so
the GGN is a better-behaved proxy for the sharpness there. Far from a minimum the Hessian has negative
eigenvalues the GGN cannot show.

Products, never forming the matrices (one forward with the graph, one forward carrying the tangents, one
backward, per batch; in :meth:`~sharpness.curvature.operator.ModelOperator.matmat` the ``k`` tangents and
cotangents are ``vmap``-ed over, so the forward passes are shared by the whole block):

- ``G V = Jᵀ (H_out (J V))``: ``torch.func.jvp`` for ``J V``, the output-Hessian product, ``torch.func.vjp``;
- ``F V = (1/n_b) J_ℓᵀ (J_ℓ V)`` per batch, with ``J_ℓ`` the Jacobian of the vector of the batch's per-example
  losses, so per-example gradients are never materialised (memory: one graph, ``k`` output-sized blocks).

In ``mode="train"`` with BatchNorm the batch's examples are coupled: ``J_b`` is the Jacobian of the whole
batch's outputs (the coupling included), and ``g_i`` is the gradient of the ``i``-th term of the batch loss
computed with the batch's statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sharpness.curvature.operator import Data, LossFn, ModelOperator, ParamFilter, _gradients, map_columns
from sharpness.curvature.state import Mode

F = nn.functional

LossKind = Literal["auto", "cross_entropy", "mse", "generic"]
LOSS_KINDS = ("auto", "cross_entropy", "mse", "generic")
Middle = Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "GGNOperator",
    "EmpiricalFisherOperator",
    "LOSS_KINDS",
    "identify_loss",
    "gauss_newton_product",
    "cross_entropy_hessian",
    "mse_hessian",
    "autograd_hessian",
]


def identify_loss(loss_fn: LossFn, loss: LossKind = "auto") -> str:
    """How :class:`GGNOperator` applies the output Hessian of ``loss_fn``: ``"cross_entropy"``, ``"mse"`` (closed
    forms) or ``"generic"`` (autograd).

    ``loss="auto"`` recognises ``F.cross_entropy``, ``nn.CrossEntropyLoss`` without class weights, ``F.mse_loss``
    and ``nn.MSELoss``; anything else (a lambda, a ``functools.partial``, a weighted cross-entropy) is
    ``"generic"``. ``loss="cross_entropy"``/``"mse"`` asserts that ``loss_fn(outputs, targets)`` is the mean
    cross-entropy/square loss of exactly these outputs (e.g. a wrapper that adds logging), with torch's default
    options unless ``loss_fn`` is the corresponding module.
    """
    if loss not in LOSS_KINDS:
        raise ValueError(f"loss must be one of {LOSS_KINDS}, got {loss!r}")
    is_module = isinstance(loss_fn, (nn.CrossEntropyLoss, nn.MSELoss))
    if is_module and loss_fn.reduction != "mean":
        raise ValueError(
            f"loss_fn must return the batch mean, got reduction={loss_fn.reduction!r}; use reduction='mean'"
        )
    weighted = isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is not None
    if loss == "cross_entropy" and weighted:
        raise ValueError("the closed-form cross-entropy Hessian has no class weights; pass loss='generic'")
    if loss != "auto":
        return loss
    if loss_fn is F.cross_entropy or (isinstance(loss_fn, nn.CrossEntropyLoss) and not weighted):
        return "cross_entropy"
    if loss_fn is F.mse_loss or isinstance(loss_fn, nn.MSELoss):
        return "mse"
    return "generic"


def cross_entropy_hessian(
    outputs: Tensor, targets: Tensor, U: Tensor, *, ignore_index: int = -100, label_smoothing: float = 0.0
) -> Tensor:
    """``H_out U`` for the mean cross-entropy of logits ``outputs`` (classes along dim 1), ``U`` of shape
    ``(k, *outputs.shape)``: per position ``i``, ``(s_i/m) (diag p_i − p_i p_iᵀ) u_i`` with ``p_i`` the softmax.

    Class-index targets: ``s_i = 1`` (0 where ``y_i = ignore_index``), ``m = Σ s_i``; label smoothing does not
    change the Hessian (its targets sum to one). Probability targets: ``s_i = (1−ε) Σ_c y_ic + ε`` and ``m`` the
    number of positions, as ``F.cross_entropy`` averages them."""
    p = torch.softmax(outputs, dim=1)
    if targets.is_floating_point():
        scale = (1.0 - label_smoothing) * targets.sum(dim=1) + label_smoothing
        count = scale.numel()
    else:
        scale = (targets != ignore_index).to(p.dtype)
        count = scale.sum()
    pu = p * U
    return (pu - p * pu.sum(dim=2, keepdim=True)) * (scale.unsqueeze(1) / count)


def mse_hessian(outputs: Tensor, U: Tensor) -> Tensor:
    """``H_out U = (2/m) U`` for ``F.mse_loss(outputs, targets)`` (mean over all ``m`` entries, targets of the
    outputs' shape)."""
    return U * (2.0 / outputs.numel())


def autograd_hessian(loss_fn: LossFn, outputs: Tensor, targets: Tensor, U: Tensor, vectorise: bool) -> Tensor:
    """``H_out U`` for any twice-differentiable ``loss_fn`` by double backward w.r.t. the outputs (batched with
    ``is_grads_batched`` when ``vectorise``); zero for a loss linear in the outputs."""
    with torch.enable_grad():
        leaf = outputs.detach().requires_grad_(True)
        (grad,) = _gradients(loss_fn(leaf, targets), [leaf], create_graph=True)
    if vectorise:
        return _gradients(grad, [leaf], grad_outputs=U, is_grads_batched=True)[0]
    return torch.stack([_gradients(grad, [leaf], grad_outputs=u, retain_graph=True)[0] for u in U])


def gauss_newton_product(
    f: Callable[..., Tensor], primals: tuple[Tensor, ...], tangents: Sequence[Tensor], middle: Middle, vectorise: bool
) -> tuple[Tensor, ...]:
    """``Jᵀ M J V`` with ``J = ∂f/∂w`` at ``primals``, for the ``k`` tangents ``V`` (one ``(k, *w.shape)`` block
    per primal): ``J V`` by ``torch.func.jvp``, ``M`` by ``middle(f(w), J V)`` on ``(k, *f.shape)``, ``Jᵀ`` by
    ``torch.func.vjp``; ``vmap``-ed over the ``k`` columns when ``vectorise``."""
    from torch.func import jvp, vjp

    outputs, pullback = vjp(f, *primals)
    pushed = map_columns(lambda *tangent: jvp(f, primals, tangent)[1], tangents, vectorise)
    return map_columns(pullback, [middle(outputs.detach(), pushed)], vectorise)


class GGNOperator(ModelOperator):
    """``v ↦ G v`` for the generalised Gauss–Newton matrix ``G = Σ_b (n_b/N) J_bᵀ H_b J_b`` (module docstring).

    Args:
        model, data, params, mode, process_group: as for :class:`~sharpness.curvature.operator.HessianOperator`
            (``data`` one batch, a list of them or a DataLoader; ``process_group`` all-reduces every product,
            weighted by the example counts).
        loss_fn: ``loss_fn(outputs, targets)`` returning the MEAN loss over the batch.
        loss: how the output Hessian ``H_b`` is applied, see :func:`identify_loss`: ``"auto"`` (default),
            ``"cross_entropy"`` (``diag p − p pᵀ`` per example, in closed form), ``"mse"`` (``2/m`` times the
            identity, ``m`` the number of output entries: ``F.mse_loss``'s mean) or ``"generic"`` (a Hessian-vector
            product of ``loss_fn`` w.r.t. the outputs by double backward; any twice-differentiable loss; ``G`` is
            then PSD only if the loss is convex in the outputs). An MSE batch whose targets' shape differs from the
            outputs' (broadcasting) takes the generic path.

    Same contract as ``HessianOperator``: flat vectors in ``named_parameters`` order, ``dim``/``dtype``/``device``,
    ``matvec``, ``matmat`` (``(dim, k)`` blocks), ``num_matvecs``, ``loss_and_gradient``; the model and its
    ``.grad`` are left exactly as found. The forward passes use ``torch.func.functional_call``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Data,
        *,
        params: ParamFilter = None,
        mode: Mode = "eval",
        process_group: Any = None,
        loss: LossKind = "auto",
    ) -> None:
        self.loss = identify_loss(loss_fn, loss)
        super().__init__(model, loss_fn, data, params=params, mode=mode, process_group=process_group)

    def output_hessian_product(self, outputs: Tensor, targets: Tensor, U: Tensor, vectorise: bool = True) -> Tensor:
        """``H_b U`` for a batch's outputs and targets, ``U`` of shape ``(k, *outputs.shape)``."""
        if self.loss == "cross_entropy":
            options = {"ignore_index": -100, "label_smoothing": 0.0}
            if isinstance(self.loss_fn, nn.CrossEntropyLoss):
                options = {"ignore_index": self.loss_fn.ignore_index, "label_smoothing": self.loss_fn.label_smoothing}
            return cross_entropy_hessian(outputs, targets, U, **options)
        if self.loss == "mse" and outputs.shape == targets.shape:
            return mse_hessian(outputs, U)
        return autograd_hessian(self.loss_fn, outputs, targets, U, vectorise)

    def _batch_product(
        self, index: int, x: Any, y: Tensor, tangents: list[Tensor], vectorise: bool
    ) -> Sequence[Tensor]:
        """``G_b V = J_bᵀ (H_b (J_b V))``."""
        network, primals = self._network(x)

        def middle(outputs: Tensor, pushed: Tensor) -> Tensor:
            return self.output_hessian_product(outputs, y, pushed, vectorise)

        return gauss_newton_product(network, primals, tangents, middle, vectorise)


class EmpiricalFisherOperator(ModelOperator):
    """``v ↦ F v`` for the empirical Fisher ``F = (1/N) Σ_i g_i g_iᵀ`` (module docstring: what it is, how it
    differs from the true Fisher = the GGN for cross-entropy, and its pitfalls, Kunstner et al. 2019).

    Args:
        model, data, params, mode, process_group: as for :class:`~sharpness.curvature.operator.HessianOperator`.
        loss_fn: ``loss_fn(outputs, targets)`` returning the MEAN loss over the batch; the per-example loss is
            ``loss_fn`` on a batch of one (``torch.func.vmap``-ed over the batch, so ``loss_fn`` must be
            vmap-compatible, as losses made of torch operations are), so that ``L_b = (1/n_b) Σ_i ℓ_i``.

    Always PSD (a sum of outer products). Same contract as ``HessianOperator`` (see :class:`GGNOperator`).
    """

    def per_example_losses(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``(ℓ_1, ..., ℓ_n)``: ``loss_fn`` on every example of the batch as a batch of one."""
        from torch.func import vmap

        return vmap(lambda o, t: self.loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(outputs, targets)

    def _batch_product(
        self, index: int, x: Any, y: Tensor, tangents: list[Tensor], vectorise: bool
    ) -> Sequence[Tensor]:
        """``F_b V = (1/n_b) J_ℓᵀ (J_ℓ V)``, ``J_ℓ`` the Jacobian of the per-example losses (rows ``g_iᵀ``)."""
        network, primals = self._network(x)

        def losses(*weights: Tensor) -> Tensor:
            return self.per_example_losses(network(*weights), y)

        return gauss_newton_product(losses, primals, tangents, lambda _, pushed: pushed / len(y), vectorise)
