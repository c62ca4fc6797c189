"""The Hessian of a model's loss on a measurement set, as a matrix-free symmetric linear operator.

``H = ∇²_w L(w)`` with ``L`` the mean per-example loss over a fixed *measurement set* (one batch, a list of
batches or a DataLoader, the batches weighted by their sizes; see :mod:`sharpness.curvature.measurement_set`).
``H v`` is computed without forming ``H``:

- ``backend="double_backward"`` (default, the robust one): ``H v = ∇_w <∇_w L, v>``, reverse-over-reverse
  (Pearlmutter 1994);
- ``backend="forward_over_reverse"``: ``H v = J_v(∇_w L)``, a forward-mode derivative of the gradient with
  ``torch.func.jvp`` (often faster; needs a model whose forward runs under ``torch.func``).

A trainable parameter the loss does not depend on (a layer defined but not used in ``forward``) has a zero
gradient and zero rows and columns in ``H``.

:class:`ModelOperator` holds what every operator of a model's loss shares (also the Gauss–Newton and Fisher
operators of :mod:`sharpness.curvature.gauss_newton`): the parameter filter (per-layer curvature), flat vectors,
the example-count weighting of the batches, the data-parallel all-reduce, and block products ``matmat(V)``.
Every product runs under the measurement mode of :func:`sharpness.curvature.state.measurement_mode` and leaves
the model as it was: the parameters and their ``.grad`` are never written, modes and buffers are restored.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sharpness.curvature.measurement_set import Batch, MeasurementSet
from sharpness.curvature.state import MODES, Mode, measurement_mode

LossFn = Callable[[Tensor, Tensor], Tensor]
ParamFilter = Callable[[str, nn.Parameter], bool] | Sequence[str] | None
Data = Batch | Sequence[Batch] | Iterable[Batch]
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


class ModelOperator:
    """A symmetric operator ``A = Σ_b n_b A_b / Σ_b n_b`` of a model's loss on a measurement set (the base class).

    ``A_b`` is the operator of batch ``b`` alone (its Hessian, Gauss–Newton matrix, ...), ``n_b = len(y_b)``; with a
    ``process_group`` the sums run over every rank's batches (one all-reduce per product, identical on every rank).
    A subclass implements :meth:`_batch_product`, ``A_b`` applied to a block of ``k`` tangents.

    Products:

    - :meth:`matvec` ``(dim,) -> (dim,)``, one column at a time (the robust path);
    - :meth:`matmat` ``(dim, k) -> (dim, k)``, the block in one pass over the data: one forward per batch for all
      ``k`` columns, the column products vectorised (``torch.func.vmap``, or ``is_grads_batched`` for double
      backward). Where vectorising raises (a custom ``autograd.Function`` without a vmap rule, ``.item()`` on a
      gradient inside a backward, running out of memory for a large ``k``) it warns once and from then on loops
      over the columns within each batch (sharing the batch's graph). Under a ``process_group`` every rank must
      fail or succeed alike (deterministic for the same model and batch shapes).

    ``num_matvecs`` counts columns: ``matvec`` adds 1, ``matmat`` adds ``k``.
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
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}")
        self.model, self.loss_fn, self.mode = model, loss_fn, mode
        self.data = MeasurementSet(data)
        self.named_params = select_parameters(model, params)
        self.params = [p for _, p in self.named_params]
        self.dim = sum(p.numel() for p in self.params)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.process_group = dist.group.WORLD if process_group == "default" else process_group
        self.num_matvecs = 0
        self._total: float | None = None  # Σ n_b over every rank, after the first pass
        self._vectorise = True

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
        """``A v`` for a flat ``v`` of shape ``(dim,)``."""
        if not isinstance(v, Tensor) or v.shape != (self.dim,):
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"expected a flat vector of shape ({self.dim},), got {shape}")
        result = self._apply(v.reshape(self.dim, 1), vectorise=False)[:, 0]
        self.num_matvecs += 1
        return result

    __matmul__ = matvec

    def matmat(self, V: Tensor) -> Tensor:
        """``A V`` for a block ``V`` of shape ``(dim, k)``: ``A`` applied to every column (``num_matvecs += k``)."""
        if not isinstance(V, Tensor) or V.ndim != 2 or V.shape[0] != self.dim or V.shape[1] == 0:
            shape = tuple(V.shape) if isinstance(V, Tensor) else type(V).__name__
            raise ValueError(f"matmat expects a block of shape ({self.dim}, k) with k >= 1, got {shape}")
        result = None
        if self._vectorise:
            try:
                result = self._apply(V, vectorise=True)
            except (RuntimeError, NotImplementedError) as error:
                self._vectorise = False
                warnings.warn(
                    f"{type(self).__name__}.matmat: vectorised products failed ({str(error).splitlines()[0]}); "
                    "looping over the columns instead",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if result is None:
            result = self._apply(V, vectorise=False)
        self.num_matvecs += V.shape[1]
        return result

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """The mean loss over the measurement set and its flat gradient (``.grad`` untouched)."""
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        grad_total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        with measurement_mode(self.model, self.mode):
            for index, x, y in self.data:
                loss, grads = self._loss_and_grads(index, x, y)
                loss_total += len(y) * loss.detach().to(torch.float64)
                grad_total.add_(self.flatten(grads).detach(), alpha=len(y))
        total = self._total_examples()
        return float(self._all_reduce(loss_total)) / total, self._all_reduce(grad_total) / total

    def _apply(self, V: Tensor, *, vectorise: bool) -> Tensor:
        """``A V`` for a ``(dim, k)`` block: ``Σ_b n_b A_b V``, all-reduced, divided by ``Σ_b n_b``."""
        V = V.to(self.device, self.dtype)
        k = V.shape[1]
        sizes = [p.numel() for p in self.params]
        tangents = [c.reshape(k, *p.shape) for c, p in zip(V.T.split(sizes, dim=1), self.params, strict=True)]
        total = torch.zeros(k, self.dim, dtype=self.dtype, device=self.device)
        with measurement_mode(self.model, self.mode):
            for index, x, y in self.data:
                product = self._batch_product(index, x, y, tangents, vectorise)
                total.add_(torch.cat([t.reshape(k, -1) for t in product], dim=1), alpha=len(y))
        total = self._all_reduce(total)
        return (total / self._total_examples()).T.contiguous()

    def _batch_product(
        self, index: int, x: Any, y: Tensor, tangents: list[Tensor], vectorise: bool
    ) -> Sequence[Tensor]:
        """``A_b`` applied to ``k`` tangents (one ``(k, *p.shape)`` block per parameter), same layout back."""
        raise NotImplementedError

    def _loss_and_grads(self, index: int, x: Any, y: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """A batch's mean loss and its gradient w.r.t. the selected parameters (no graph kept)."""
        with torch.enable_grad():
            loss = self.loss_fn(self.model(x), y)
            return loss, _gradients(loss, self.params)

    def _total_examples(self) -> float:
        """``Σ_b n_b`` over every rank (one all-reduce, after the first pass over the data)."""
        if self._total is None:
            local = torch.tensor(float(self.data.num_examples or 0), dtype=torch.float64)
            self._total = float(self._all_reduce(local))
            if self._total == 0:
                raise ValueError("the measurement set is empty; pass data with at least one example")
        return self._total

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over the ranks of :attr:`process_group` (``tensor`` itself without one)."""
        if self.process_group is not None:
            tensor = tensor.to(self.device)
            dist.all_reduce(tensor, group=self.process_group)
        return tensor

    def _network(self, x: Any) -> tuple[Callable[..., Tensor], tuple[Tensor, ...]]:
        """``f(*w) = model(x)`` as a function of the selected weights for ``torch.func`` (the unselected parameters
        frozen, detached), and the selected weights' current values (detached)."""
        from torch.func import functional_call

        names = [name for name, _ in self.named_params]
        frozen = {name: p.detach() for name, p in self.model.named_parameters() if name not in set(names)}

        def network(*weights: Tensor) -> Tensor:
            return functional_call(self.model, {**frozen, **dict(zip(names, weights, strict=True))}, (x,))

        return network, tuple(p.detach() for p in self.params)


class HessianOperator(ModelOperator):
    """``v ↦ H v`` for the Hessian of the mean loss of ``model`` over ``data`` w.r.t. the selected parameters.

    Args:
        model: the network (left exactly as found after every product).
        loss_fn: ``loss_fn(outputs, targets)`` returning the MEAN loss over the batch (e.g. ``F.cross_entropy``).
        data: the measurement set: one ``(x, y)`` batch, a list of them, or a re-iterable such as a DataLoader
            (:mod:`~sharpness.curvature.measurement_set`); batches are weighted by size, so the operator is the
            Hessian of the mean per-example loss over the whole set.
        params: parameter filter, see :func:`select_parameters`.
        backend: ``"double_backward"`` or ``"forward_over_reverse"``.
        mode: ``"eval"`` (default) or ``"train"``, see :func:`~sharpness.curvature.state.measurement_mode`.
        cache_graph: (double backward) build each batch's gradient graph once, on the first product, and reuse it
            for every later product: one backward per product instead of a forward and two backwards, as
            PyHessian does, at the price of keeping the graphs in memory. Only for a bounded measurement set
            (one batch, or a list/tuple of at most ``MAX_CACHED_BATCHES`` = 8 batches); for more batches, a
            DataLoader or any other iterable, each product rebuilds one batch's graph at a time, so memory does
            not grow with the number of batches. The operator is then a snapshot of the weights at its first
            product: later changes of the weights are NOT reflected (autograd raises if it sees one of the
            weights it saved changed in place, but not for all of them). Create a new operator after the
            weights change, or pass ``cache_graph=False``.
        process_group: data-parallel measurement (a ``torch.distributed`` process group, or ``"default"`` for
            the default group; every rank passes the same model and its own part of the measurement set). A
            product is then the mean over all ranks' examples, ``H v = Σ_r n_r H_r v / Σ_r n_r`` (one all-reduce
            per product), identical on every rank, so every estimator (Lanczos, Hutchinson, Hutch++, Frobenius,
            SLQ) runs unchanged on top as long as it draws the same random vectors everywhere (its default
            generator, seeded 0, does). Every rank must call the same products.

    Vectors are flat: the selected parameters concatenated in ``named_parameters`` order (:meth:`flatten`,
    :meth:`unflatten`). ``num_matvecs`` counts the products taken; :meth:`matmat` takes a ``(dim, k)`` block
    (``torch.autograd.grad(..., is_grads_batched=True)`` for double backward, ``vmap`` over the tangents for
    forward-over-reverse), see :class:`ModelOperator`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Data,
        *,
        params: ParamFilter = None,
        backend: Literal["double_backward", "forward_over_reverse"] = "double_backward",
        mode: Mode = "eval",
        cache_graph: bool = True,
        process_group: Any = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        super().__init__(model, loss_fn, data, params=params, mode=mode, process_group=process_group)
        self.backend = backend
        self.cache_graph = cache_graph
        self._caches = cache_graph and backend == "double_backward" and self.data.bounded
        self._graphs: dict[int, tuple[Tensor, tuple[Tensor, ...]]] = {}  # batch index -> (loss, grads with graph)

    @property
    def prefers_blocks(self) -> bool:
        """Whether the block estimators should use :meth:`matmat` (:func:`~sharpness.curvature.linop.apply_block`):
        not for double backward on a CPU, where a batched backward is no faster per vector than single ones and
        Hutch++ through it measured slower (``benchmarks/bench_hessian.py``: 0.92–0.96× per vector; Hutch++ 1.96 s
        against 1.30 s column by column on ``cnn1d``). :meth:`matmat` itself still vectorises when called."""
        return not (self.backend == "double_backward" and self.device.type == "cpu")

    def _batch_product(
        self, index: int, x: Any, y: Tensor, tangents: list[Tensor], vectorise: bool
    ) -> Sequence[Tensor]:
        if self.backend == "double_backward":
            return self._double_backward(index, x, y, tangents, vectorise)
        return self._forward_over_reverse(x, y, tangents, vectorise)

    def _loss_and_grads(self, index: int, x: Any, y: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        return self._graph(index, x, y) if self._caches else super()._loss_and_grads(index, x, y)

    def _graph(self, index: int, x: Any, y: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """A batch's loss and gradient with its graph (from the cache when there is one)."""
        if index in self._graphs:
            return self._graphs[index]
        with torch.enable_grad():
            loss = self.loss_fn(self.model(x), y)
            grads = _gradients(loss, self.params, create_graph=True)
        if self._caches:
            self._graphs[index] = (loss, grads)
        return loss, grads

    def _double_backward(
        self, index: int, x: Any, y: Tensor, tangents: list[Tensor], vectorise: bool
    ) -> Sequence[Tensor]:
        """``H_b V = ∇_w <∇_w L_b, V>``: the backward of the gradient with the tangents as cotangents."""
        _, grads = self._graph(index, x, y)
        live = [i for i, g in enumerate(grads) if g.requires_grad]  # the others are constant: zero rows
        if not live:
            return [p.new_zeros(t.shape) for p, t in zip(self.params, tangents, strict=True)]
        outputs, cotangents = [grads[i] for i in live], [tangents[i] for i in live]
        if vectorise:
            products = _gradients(
                outputs, self.params, grad_outputs=cotangents, retain_graph=True, is_grads_batched=True
            )
        else:
            products = map_columns(
                lambda *c: _gradients(outputs, self.params, grad_outputs=list(c), retain_graph=True), cotangents, False
            )
        return [product.detach() for product in products]

    def _forward_over_reverse(self, x: Any, y: Tensor, tangents: list[Tensor], vectorise: bool) -> Sequence[Tensor]:
        """``H_b V = J_V(∇_w L_b)``: ``torch.func.jvp`` of the gradient, vmapped over the tangents."""
        from torch.func import grad, jvp

        network, primals = self._network(x)

        def gradient(weights: tuple[Tensor, ...], targets: Tensor) -> tuple[Tensor, ...]:
            return grad(lambda w: self.loss_fn(network(*w), targets))(weights)

        def column(*tangent: Tensor) -> tuple[Tensor, ...]:
            if y.is_floating_point():
                # An explicit zero tangent for real-valued targets: torch's forward-mode formula of
                # mse_loss_backward writes into the implicit one, which is immutable ("ZeroTensors are
                # immutable"). Not jacrev instead of grad: it avoids that error but gets BatchNorm's weight wrong
                # in train mode (torch 2.13).
                return jvp(gradient, (primals, y), (tangent, torch.zeros_like(y)))[1]
            return jvp(lambda weights: gradient(weights, y), (primals,), (tangent,))[1]

        return map_columns(column, tangents, vectorise)


def map_columns(
    fn: Callable[..., Tensor | tuple[Tensor, ...]], blocks: Sequence[Tensor], vectorise: bool
) -> Tensor | tuple[Tensor, ...]:
    """``fn`` applied to column ``j`` of every block (each ``(k, ...)``), results stacked along a leading ``k``:
    ``torch.func.vmap(fn)`` when ``vectorise``, else a loop over ``j``."""
    if vectorise:
        from torch.func import vmap

        return vmap(fn)(*blocks)
    results = [fn(*(block[j] for block in blocks)) for j in range(blocks[0].shape[0])]
    if isinstance(results[0], Tensor):
        return torch.stack(results)
    return tuple(torch.stack(parts) for parts in zip(*results, strict=True))


def _gradients(
    outputs: Tensor | Sequence[Tensor], params: Sequence[Tensor], *, is_grads_batched: bool = False, **kwargs: Any
) -> tuple[Tensor, ...]:
    """``torch.autograd.grad(outputs, params, **kwargs)`` with zeros for the parameters ``outputs`` does not depend
    on (also when it depends on none of them); with ``is_grads_batched`` every result has the leading dimension
    of the cotangents ``grad_outputs``."""
    outputs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    cotangents = kwargs.get("grad_outputs")
    if isinstance(cotangents, Tensor):
        kwargs["grad_outputs"] = [cotangents]
    batch = (kwargs["grad_outputs"][0].shape[0],) if is_grads_batched else ()
    if not any(output.requires_grad for output in outputs):
        return tuple(p.new_zeros(batch + p.shape) for p in params)
    grads = torch.autograd.grad(outputs, params, allow_unused=True, is_grads_batched=is_grads_batched, **kwargs)
    return tuple(p.new_zeros(batch + p.shape) if g is None else g for p, g in zip(params, grads, strict=True))
