"""sharpness: sharpness-aware training (the SAM optimizer family) and sharpness analysis for PyTorch.

The top level re-exports :mod:`sharpness.optim` (``SAM``, ``MSAM``, the presets, policies, reuse and ``frozen_bn``).
"""

from sharpness.optim import *  # noqa: F403
from sharpness.optim import __all__ as _optim_all

__version__ = "0.1.0"

__all__ = [*_optim_all, "__version__"]
