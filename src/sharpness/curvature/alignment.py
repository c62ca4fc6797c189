"""The alignment factor of SGD noise and the Hessian's Frobenius norm from the NTK Gram (square loss).

Wu, Wang & Su, "The alignment property of SGD noise and how it helps select flat minima: a stability
analysis" (NeurIPS 2022, arXiv 2207.02628); papers.md §4.

Conventions. ``n`` examples, model outputs ``f(x_i) ∈ R^k`` (``k = 1`` for scalar outputs), residuals
``r_i = f(x_i) − y_i`` and the loss

    L(w) = (1/2n) Σ_i ||f(x_i) − y_i||² = (1/n) Σ_i l_i,      l_i = ½ ||r_i||².

(PyTorch's ``F.mse_loss`` averages over all ``n k`` entries and has no ½: it is ``(2/k) L``; the Hessian and
its norm scale by the same factor, ``μ`` is unchanged: it is invariant to a rescaling of the loss.)

Every output coordinate is a row of the Jacobian: ``J ∈ R^{nk × d}`` with row ``i k + j`` the gradient of the
``j``-th output on example ``i`` (example-major), and the NTK Gram is ``K = J Jᵀ ∈ R^{nk × nk}``; ``r`` is the
flat ``nk`` vector in the same order.

- Gauss–Newton matrix ``G = (1/n) Jᵀ J``, the Hessian less the term ``(1/n) Σ r_ij ∇² f_j(x_i)``, so ``G = H`` at
  an interpolating minimum (``r = 0``). ``Jᵀ J`` and ``J Jᵀ`` have the same non-zero eigenvalues, hence
  ``||G||_F = ||K||_F / n`` (papers.md §4, exactly; with ``n`` the number of examples, not ``nk``).
- SGD noise covariance ``Σ = (1/n) Σ_i ∇l_i ∇l_iᵀ − ∇L ∇Lᵀ`` with ``∇l_i = J_iᵀ r_i`` (``J_i`` the ``k`` rows of
  example ``i``) and ``∇L = (1/n) Jᵀ r``. The alignment factor ``μ = Tr(Σ G) / (2 L ||G||_F²)`` becomes

      μ = [n Σ_i r_iᵀ (K²)_{ii} r_i − rᵀ K² r] / (||r||² ||K||_F²),

  with ``(K²)_{ii}`` the ``k × k`` diagonal block of example ``i``: ``Tr(ΣG) = (1/n²) Σ_i r_iᵀ(K²)_{ii} r_i −
  (1/n³) rᵀK²r``, ``2L = ||r||²/n`` and ``||G||_F² = ||K||_F²/n²``. For ``k = 1`` this is papers.md's formula
  ``[n Σ_i r_i² (K²)_ii − rᵀK²r] / (||r||² ||K||_F²)`` exactly; the two normalisations there (``||H||_F =
  ||K||_F/n`` and ``μ``) agree with each other under the ``(1/2n)`` loss above. For ``k > 1`` the noise is that of
  sampling *examples* (all ``k`` outputs of an example together); treating every output coordinate as an
  independent example would give a different number. ``μ = nan`` when ``r = 0`` or ``K = 0`` (``0/0``).

Stability bound: a minimum that SGD with step ``η`` and batch ``B`` is linearly stable at has
``||H||_F ≤ (1/η) √(B/μ)`` (:func:`sharpness.curvature.edges.sgd_frobenius_bound`).

Cost: one Jacobian of the batch output (``torch.func.jacrev``: ``nk`` vector-Jacobian products, vectorised) and
``O(d (nk)²)`` for the Gram; memory ``O(nk · d)`` for the Jacobian. Meant for ``n`` up to a few hundred. The whole
batch goes through the model at once, so in ``mode="train"`` a BatchNorm layer's cross-example coupling is part
of ``J`` (the true Jacobian of the batch outputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sharpness.checks import check_integer
from sharpness.curvature.operator import ParamFilter, select_parameters
from sharpness.curvature.state import MODES, Mode, measurement_mode

__all__ = ["NTKQuantities", "ntk_quantities", "alignment_factor"]


@dataclass(frozen=True)
class NTKQuantities:
    """NTK Gram, residuals, and the curvature quantities of Wu, Wang & Su (2022) for the square loss.

    Attributes:
        gram: ``K = J Jᵀ``, ``(nk, nk)``, rows example-major (row ``i k + j``: output ``j`` of example ``i``).
        residuals: ``r = f(x) − y`` flattened in the same order, ``(nk,)``.
        loss: ``L = ||r||² / (2n)``.
        hessian_frobenius: ``||G||_F = ||K||_F / n``, the Frobenius norm of the Gauss–Newton matrix of ``L``
            (the Hessian's at an interpolating minimum).
        mu: the alignment factor ``Tr(ΣG) / (2L ||G||_F²)`` (``nan`` when ``r = 0`` or ``K = 0``).
        num_examples: ``n``.
        num_outputs: ``k``.
    """

    gram: Tensor
    residuals: Tensor
    loss: float
    hessian_frobenius: float
    mu: float
    num_examples: int
    num_outputs: int


def alignment_factor(gram: Tensor, residuals: Tensor, num_examples: int) -> float:
    """``μ = [n Σ_i r_iᵀ (K²)_{ii} r_i − rᵀK²r] / (||r||² ||K||_F²)`` from a Gram ``K`` (``nk × nk``, example-major)
    and residuals ``r`` (``nk``); ``(K²)_{ii}`` is example ``i``'s ``k × k`` diagonal block. Computed in float64;
    ``nan`` when the denominator is 0."""
    num_examples = check_integer(num_examples, "num_examples", low=1)
    size = residuals.numel()
    if gram.shape != (size, size) or size % num_examples:
        raise ValueError(
            f"gram must be (nk, nk) and residuals (nk,) with nk a multiple of num_examples = {num_examples}; "
            f"got {tuple(gram.shape)} and {tuple(residuals.shape)}"
        )
    n, k = num_examples, size // num_examples
    kernel = gram.detach().double()
    r = residuals.detach().double().reshape(-1)
    squared = kernel @ kernel
    blocks = torch.einsum("iaib->iab", squared.reshape(n, k, n, k))  # (n, k, k): the diagonal blocks of K²
    rows = r.reshape(n, k)
    diagonal = torch.einsum("ia,iab,ib->", rows, blocks, rows)
    numerator = n * diagonal - r @ squared @ r
    denominator = (r @ r) * (kernel * kernel).sum()
    if float(denominator) == 0.0:
        return math.nan
    return float(numerator / denominator)


def ntk_quantities(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    params: ParamFilter = None,
    mode: Mode = "eval",
) -> NTKQuantities:
    """The NTK Gram ``K = J Jᵀ``, residuals, ``||G||_F = ||K||_F / n`` and the alignment factor ``μ`` on ``(x, y)``.

    Args:
        model: a network ``f``; its output on ``x`` has a leading dimension ``n = len(x)``; the rest is flattened
            to ``k`` outputs per example. Left exactly as found (parameters, ``.grad``, buffers, modes).
        x: the inputs, ``n`` examples.
        y: the targets, ``n k`` numbers (any shape with ``n`` rows, e.g. ``(n,)`` for ``k = 1``).
        params: parameter filter (:func:`~sharpness.curvature.operator.select_parameters`): ``J`` and ``G`` are
            taken with respect to the selected parameters only.
        mode: ``"eval"`` or ``"train"`` (:func:`~sharpness.curvature.state.measurement_mode`).

    The loss convention is ``L = (1/2n) Σ_i ||f(x_i) − y_i||²`` (see the module docstring).
    """
    from torch.func import functional_call, jacrev

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    n = len(x)
    if n < 1:
        raise ValueError("x holds no example")
    if len(y) != n:
        raise ValueError(f"x and y hold different numbers of examples ({n} and {len(y)})")
    named = select_parameters(model, params)
    names = [name for name, _ in named]

    def outputs(weights: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        out = functional_call(model, weights, (x,)).reshape(n, -1)
        return out, out.detach()

    with measurement_mode(model, mode), torch.no_grad():  # no graph through the unselected parameters
        primals = {name: p.detach() for name, p in named}
        jacobian, out = jacrev(outputs, has_aux=True)(primals)  # function transforms ignore the outer no_grad
    k = out.shape[1]
    if y.numel() != n * k:
        raise ValueError(f"y has {y.numel()} numbers; the model gives {n} x {k} = {n * k} outputs")
    gram = None
    for name in names:
        block = jacobian.pop(name).reshape(n * k, -1)
        gram = block @ block.T if gram is None else gram.addmm_(block, block.T)
    residuals = (out - y.detach().reshape(n, k).to(out)).reshape(-1)
    squared = float(residuals.double() @ residuals.double())
    return NTKQuantities(
        gram=gram,
        residuals=residuals,
        loss=squared / (2 * n),
        hessian_frobenius=float(torch.linalg.matrix_norm(gram.double())) / n,
        mu=alignment_factor(gram, residuals, n),
        num_examples=n,
        num_outputs=k,
    )
