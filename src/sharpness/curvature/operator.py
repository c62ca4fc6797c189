"""The Hessian of a model's loss on a measurement set, as a matrix-free symmetric linear operator.

``H = ∇²_w L(w)`` with ``L`` the mean per-example loss over a fixed *measurement set* (one batch, or a list of
batches weighted by their sizes). ``H v`` is computed without forming ``H``:

- ``backend="double_backward"`` (default, the robust one): ``H v = ∇_w <∇_w L, v>``, reverse-over-reverse
  (Pearlmutter 1994);
- ``backend="forward_over_reverse"``: ``H v = J_v(∇_w L)``, a forward-mode derivative of the gradient with
  ``torch.func.jvp`` (often faster; needs a model whose forward runs under ``torch.func``).

A trainable parameter the loss does not depend on (a layer defined but not used in ``forward``) has a zero
gradient and zero rows and columns in ``H``.

A parameter filter restricts ``w`` to some parameters (per-layer curvature). Every product runs under the
measurement mode of :func:`sharpness.curvature.state.measurement_mode` and leaves the model as it was: the
parameters and their ``.grad`` are never written, modes and buffers are restored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sharpness.curvature.state import Mode, measurement_mode

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
ParamFilter = Callable[[str, nn.Parameter], bool] | Sequence[str] | None
BACKENDS = ("double_backward", "forward_over_reverse")


def select_parameters(model: nn.Module, params: ParamFilter = None) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs a filter selects: ``None`` = all trainable parameters; a sequence of names
    or name prefixes (``"layer1"`` selects ``layer1.weight`` and ``layer1.bias``); or a predicate ``(name, p)``."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if params is None:
        selected = named
    elif callable(params):
        selected = [(name, p) for name, p in named if params(name, p)]
    else:
        prefixes = [params] if isinstance(params, str) else list(params)
        unknown = [q for q in prefixes if not any(name == q or name.startswith(q + ".") for name, _ in named)]
        if unknown:
            raise ValueError(
                f"parameter filter {unknown} matches no trainable parameter; names: {[n for n, _ in named]}"
            )
        selected = [(name, p) for name, p in named if any(name == q or name.startswith(q + ".") for q in prefixes)]
    if not selected:
        raise ValueError("the parameter filter selects no trainable parameter")
    return selected


class HessianOperator:
    """``v ↦ H v`` for the Hessian of the mean loss of ``model`` over ``data`` w.r.t. the selected parameters.

    Args:
        model: the network (left exactly as found after every product).
        loss_fn: ``loss_fn(outputs, targets)`` returning the MEAN loss over the batch (e.g. ``F.cross_entropy``).
        data: one ``(x, y)`` batch or a sequence of them (the measurement set); batches are weighted by size, so
            the operator is the Hessian of the mean per-example loss over the whole set.
        params: parameter filter, see :func:`select_parameters`.
        backend: ``"double_backward"`` or ``"forward_over_reverse"``.
        mode: ``"eval"`` (default) or ``"train"``, see :func:`~sharpness.curvature.state.measurement_mode`.
        cache_graph: (double backward) build each batch's gradient graph once, on the first product, and reuse it
            for every later product: one backward per product instead of a forward and two backwards, as
            PyHessian does, at the price of keeping the graph in memory. The operator is then a snapshot of the
            weights at its first product: later changes of the weights are NOT reflected (autograd raises if it
            sees one of the weights it saved changed in place, but not for all of them). Create a new operator
            after the weights change, or pass ``cache_graph=False``.
        process_group: data-parallel measurement (a ``torch.distributed`` process group, or ``"default"`` for
            the default group; every rank passes the same model and its own part of the measurement set). A
            product is then the mean over all ranks' examples, ``H v = Σ_r n_r H_r v / Σ_r n_r`` (one all-reduce
            per product), identical on every rank, so every estimator (Lanczos, Hutchinson, Hutch++, Frobenius,
            SLQ) runs unchanged on top as long as it draws the same random vectors everywhere (its default
            generator, seeded 0, does). Every rank must call the same products.

    Vectors are flat: the selected parameters concatenated in ``named_parameters`` order (:meth:`flatten`,
    :meth:`unflatten`). ``num_matvecs`` counts the products taken.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Batch | Sequence[Batch],
        *,
        params: ParamFilter = None,
        backend: Literal["double_backward", "forward_over_reverse"] = "double_backward",
        mode: Mode = "eval",
        cache_graph: bool = True,
        process_group: Any = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
        batches = [data] if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor) else list(data)
        if not batches:
            raise ValueError("the measurement set is empty; pass an (x, y) batch or a list of them")
        self.model, self.loss_fn, self.batches = model, loss_fn, batches
        self.backend, self.mode = backend, mode
        self.named_params = select_parameters(model, params)
        self.params = [p for _, p in self.named_params]
        self.dim = sum(p.numel() for p in self.params)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.process_group = dist.group.WORLD if process_group == "default" else process_group
        total = self._all_reduce(torch.tensor(float(sum(len(y) for _, y in batches)), dtype=torch.float64))
        self._weights = [len(y) / float(total) for _, y in batches]
        self.num_matvecs = 0
        self.cache_graph = cache_graph
        self._caches = cache_graph and backend == "double_backward"
        self._graphs: dict[int, tuple[Tensor, tuple[Tensor, ...]]] = {}  # batch index -> (loss, grads with graph)

    # ------------------------------------------------------------------ flat vectors

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vector: Tensor) -> list[Tensor]:
        if vector.shape != (self.dim,):
            raise ValueError(f"expected a flat vector of shape ({self.dim},), got {tuple(vector.shape)}")
        chunks = vector.split([p.numel() for p in self.params])
        return [chunk.view_as(p) for chunk, p in zip(chunks, self.params, strict=True)]

    # ------------------------------------------------------------------ products

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a flat ``v``."""
        vs = self.unflatten(v.to(self.device, self.dtype))
        product = _HVP[self.backend]
        with measurement_mode(self.model, self.mode):
            total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
            for index, weight in enumerate(self._weights):
                total.add_(self.flatten(product(self, index, vs)), alpha=weight)
        self.num_matvecs += 1
        return self._all_reduce(total)

    __matmul__ = matvec

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """The mean loss over the measurement set and its flat gradient (``.grad`` untouched)."""
        loss_total = 0.0
        grad_total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        with measurement_mode(self.model, self.mode):
            for index, weight in enumerate(self._weights):
                loss, grads = self._loss_and_grads(index, create_graph=self._caches)
                loss_total += weight * float(loss.detach())
                grad_total.add_(self.flatten(grads).detach(), alpha=weight)
        loss_total = float(self._all_reduce(torch.tensor(loss_total, dtype=torch.float64, device=self.device)))
        return loss_total, self._all_reduce(grad_total)

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over the ranks of :attr:`process_group` (``tensor`` itself without one)."""
        if self.process_group is not None:
            tensor = tensor.to(self.device)
            dist.all_reduce(tensor, group=self.process_group)
        return tensor

    def _loss_and_grads(self, index: int, *, create_graph: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
        """A batch's loss and gradient (from the cached graph when there is one)."""
        if index in self._graphs:
            return self._graphs[index]
        x, y = self.batches[index]
        with torch.enable_grad():
            loss = self.loss_fn(self.model(x), y)
            grads = _gradients(loss, self.params, create_graph=create_graph)
        if create_graph and self._caches:
            self._graphs[index] = (loss, grads)
        return loss, grads

    def _double_backward(self, index: int, vs: list[Tensor]) -> tuple[Tensor, ...]:
        _, grads = self._loss_and_grads(index, create_graph=True)
        with torch.enable_grad():
            dot = sum((g * v).sum() for g, v in zip(grads, vs, strict=True))
            return _gradients(dot, self.params, retain_graph=self.cache_graph)

    def _forward_over_reverse(self, index: int, vs: list[Tensor]) -> tuple[Tensor, ...]:
        from torch.func import functional_call, grad, jvp

        x, y = self.batches[index]
        names = [name for name, _ in self.named_params]

        def gradient(weights: dict[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
            return grad(lambda w: self.loss_fn(functional_call(self.model, w, (x,)), targets))(weights)

        primals = {name: p.detach() for name, p in self.named_params}
        tangents = dict(zip(names, vs, strict=True))
        if y.is_floating_point():
            # An explicit zero tangent for real-valued targets: torch's forward-mode formula of mse_loss_backward
            # writes into the implicit one, which is immutable ("ZeroTensors are immutable"). Not jacrev instead
            # of grad: it avoids that error but gets BatchNorm's weight wrong in train mode (torch 2.13).
            _, hv = jvp(gradient, (primals, y), (tangents, torch.zeros_like(y)))
        else:
            _, hv = jvp(lambda weights: gradient(weights, y), (primals,), (tangents,))
        return tuple(hv[name] for name in names)


def _gradients(output: Tensor, params: Sequence[Tensor], **kwargs) -> tuple[Tensor, ...]:
    """``torch.autograd.grad(output, params, **kwargs)`` with zeros for the parameters ``output`` does not depend on
    (also when it depends on none of them)."""
    if not output.requires_grad:
        return tuple(torch.zeros_like(p) for p in params)
    grads = torch.autograd.grad(output, params, allow_unused=True, **kwargs)
    return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True))


_HVP = {
    "double_backward": HessianOperator._double_backward,
    "forward_over_reverse": HessianOperator._forward_over_reverse,
}
