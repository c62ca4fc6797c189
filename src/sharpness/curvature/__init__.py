"""Curvature of a model's loss: matrix-free operators (Hessian, Gauss–Newton, Fisher) and estimators on top of them.

- :class:`HessianOperator` (``operator.py``): ``v ↦ Hv`` on a measurement set, double-backward or
  forward-over-reverse, with a parameter filter and an explicit eval/train mode; the model is left as found.
- :class:`GGNOperator` and :class:`EmpiricalFisherOperator` (``gauss_newton.py``): the generalised Gauss–Newton
  matrix ``Jᵀ H_out J`` and the empirical Fisher ``(1/N) Σ gᵢgᵢᵀ``, PSD, same contract; every operator takes one
  batch, a list of them or a DataLoader, and has ``matmat(V)`` for ``(dim, k)`` blocks.
- Estimators, plain functions on any symmetric operator (the protocol: ``linop.py``): :func:`top_eigenvalues`
  (block Lanczos, ``eigen.py``), :func:`power_iteration`, :func:`hutchinson_trace`, :func:`hutchpp_trace`,
  :func:`frobenius_norm` (``trace.py``), :func:`spectral_density` (stochastic Lanczos quadrature, ``density.py``),
  :func:`bulk_ratio`.
- Stability edges (``edges.py``): :func:`gd_edge`, :func:`momentum_edge`, :func:`adam_edge`, :func:`sam_edge`,
  :func:`sam_edge_around`, :func:`msam_edge`, :func:`sam_edge_unnormalized`, :func:`sgd_frobenius_bound`; the one
  that applies to an optimizer (``optimizer_edges.py``): :func:`optimizer_edge`. Adaptive optimizers' preconditioned
  sharpness ``λ_max(P⁻¹H)`` (``preconditioned.py``): :func:`adaptive_preconditioner`, :class:`PreconditionedOperator`.
- ρ-sharpness (``rho_sharpness.py``): :func:`worst_case_sharpness`, :func:`average_case_sharpness`,
  :func:`m_sharpness` (Andriushchenko et al. 2023; Foret et al. 2021).
- The SGD-noise alignment factor μ and the NTK form of ``||H||_F`` (``alignment.py``): :func:`ntk_quantities`.

Live tracking during training is a training callback, :class:`sharpness.train.tracking.SharpnessTracker` (it uses
this package; this package does not use the training loop). ``sharpness.curvature.SharpnessTracker`` still finds it,
with a DeprecationWarning, for one release.
"""

import warnings
from typing import Any

from sharpness.curvature.alignment import NTKQuantities, alignment_factor, ntk_quantities
from sharpness.curvature.density import SpectralDensity, spectral_density
from sharpness.curvature.edges import (
    adam_edge,
    gd_edge,
    momentum_edge,
    msam_edge,
    sam_edge,
    sam_edge_around,
    sam_edge_unnormalized,
    sgd_frobenius_bound,
)
from sharpness.curvature.eigen import EigenResult, PowerResult, bulk_ratio, power_iteration, top_eigenvalues
from sharpness.curvature.gauss_newton import EmpiricalFisherOperator, GGNOperator
from sharpness.curvature.linop import DenseOperator, LinearOperator
from sharpness.curvature.operator import HessianOperator, select_parameters
from sharpness.curvature.optimizer_edges import StabilityEdge, optimizer_edge
from sharpness.curvature.preconditioned import PreconditionedOperator, adaptive_preconditioner
from sharpness.curvature.rho_sharpness import (
    MSharpness,
    SharpnessEstimate,
    average_case_sharpness,
    m_sharpness,
    worst_case_sharpness,
)
from sharpness.curvature.state import measurement_mode
from sharpness.curvature.trace import FrobeniusEstimate, TraceEstimate, frobenius_norm, hutchinson_trace, hutchpp_trace

__all__ = [
    "DenseOperator",
    "EigenResult",
    "EmpiricalFisherOperator",
    "FrobeniusEstimate",
    "GGNOperator",
    "HessianOperator",
    "MSharpness",
    "NTKQuantities",
    "SharpnessEstimate",
    "LinearOperator",
    "PowerResult",
    "PreconditionedOperator",
    "SpectralDensity",
    "StabilityEdge",
    "TraceEstimate",
    "adam_edge",
    "adaptive_preconditioner",
    "alignment_factor",
    "average_case_sharpness",
    "bulk_ratio",
    "frobenius_norm",
    "gd_edge",
    "hutchinson_trace",
    "hutchpp_trace",
    "m_sharpness",
    "measurement_mode",
    "momentum_edge",
    "msam_edge",
    "ntk_quantities",
    "optimizer_edge",
    "power_iteration",
    "sam_edge",
    "sam_edge_around",
    "sam_edge_unnormalized",
    "select_parameters",
    "sgd_frobenius_bound",
    "spectral_density",
    "top_eigenvalues",
    "worst_case_sharpness",
]


def __getattr__(name: str) -> Any:
    """``SharpnessTracker``, moved to :mod:`sharpness.train.tracking` (a DeprecationWarning; imported on use, so that
    this package never imports the training loop)."""
    if name == "SharpnessTracker":
        warnings.warn(
            "sharpness.curvature.SharpnessTracker moved to sharpness.train.tracking.SharpnessTracker; the old name "
            "will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        from sharpness.train.tracking import SharpnessTracker

        return SharpnessTracker
    raise AttributeError(f"module 'sharpness.curvature' has no attribute {name!r}")
