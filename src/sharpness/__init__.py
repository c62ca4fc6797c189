"""sharpness: sharpness-aware training (the SAM optimizer family) and sharpness analysis for PyTorch.

The top level holds the optimizers; everything else lives in its subpackage, loaded on first use
(``sharpness.curvature`` works after a plain ``import sharpness``):

- optimizers: :class:`SAM`, :class:`MSAM`, the presets (:class:`PeriodicSAM`, :class:`RandomSAM`, :class:`LookSAM`,
  :class:`AESAM`, :class:`AELookSAM`, :class:`LateSAM`), :func:`perturb_subset`, :func:`frozen_bn`,
  :func:`unperturbed_weights`; policies and reuse rules in :mod:`sharpness.optim.policy` and
  :mod:`sharpness.optim.reuse` (:mod:`sharpness.optim` exports them too);
- curvature: :mod:`sharpness.curvature` (Hessian and Gauss–Newton operators, eigenvalues, traces, densities,
  stability edges, ρ-sharpness);
- training: :mod:`sharpness.train` (the Trainer, callbacks, checkpoints), :mod:`sharpness.data`,
  :mod:`sharpness.models`;
- experiments and the command line: :mod:`sharpness.experiments`, :mod:`sharpness.reproductions`,
  :mod:`sharpness.theory`, :mod:`sharpness.integrations`.

>>> import torch, sharpness
>>> model = torch.nn.Linear(4, 2)
>>> opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
>>> isinstance(sharpness.AESAM(model.parameters(), torch.optim.SGD, lr=0.1), sharpness.SAM)
True
>>> sharpness.curvature.gd_edge(0.1)
20.0
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from sharpness.optim.batchnorm import frozen_bn
from sharpness.optim.msam import MSAM, unperturbed_weights
from sharpness.optim.presets import AESAM, AELookSAM, LateSAM, LookSAM, PeriodicSAM, RandomSAM
from sharpness.optim.sam import SAM
from sharpness.optim.subset import perturb_subset

__version__ = "0.1.0"

__all__ = [
    "AELookSAM",
    "AESAM",
    "LateSAM",
    "LookSAM",
    "MSAM",
    "PeriodicSAM",
    "RandomSAM",
    "SAM",
    "frozen_bn",
    "perturb_subset",
    "unperturbed_weights",
    "__version__",
]

_SUBPACKAGES = (
    "curvature",
    "data",
    "experiments",
    "integrations",
    "models",
    "optim",
    "reproductions",
    "theory",
    "train",
)
_MOVED = {  # top-level names of version 0.1, kept for one release: where they live now
    "Adaptive": "sharpness.optim.policy",
    "Always": "sharpness.optim.policy",
    "Bernoulli": "sharpness.optim.policy",
    "EveryK": "sharpness.optim.policy",
    "Late": "sharpness.optim.policy",
    "Policy": "sharpness.optim.policy",
    "LookSAMReuse": "sharpness.optim.reuse",
    "BatchNormStatsGuard": "sharpness.optim.batchnorm",
}


def __getattr__(name: str) -> Any:
    """The subpackages on first use; the names of version 0.1 that moved, with a DeprecationWarning."""
    if name in _SUBPACKAGES:
        return importlib.import_module(f"sharpness.{name}")
    if name in _MOVED:
        warnings.warn(
            f"sharpness.{name} is deprecated and will be removed in the next release; import it from {_MOVED[name]}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'sharpness' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, *_SUBPACKAGES])
