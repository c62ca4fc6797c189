"""sharpness: sharpness-aware training (the SAM optimizer family) and sharpness analysis for PyTorch."""

from sharpness.optim import (
    AESAM,
    SAM,
    Adaptive,
    AELookSAM,
    Always,
    BatchNormStatsGuard,
    Bernoulli,
    EveryK,
    LookSAM,
    LookSAMReuse,
    PeriodicSAM,
    RandomSAM,
    frozen_bn,
)

__version__ = "0.1.0"

__all__ = [
    "AELookSAM",
    "AESAM",
    "Adaptive",
    "Always",
    "BatchNormStatsGuard",
    "Bernoulli",
    "EveryK",
    "LookSAM",
    "LookSAMReuse",
    "PeriodicSAM",
    "RandomSAM",
    "SAM",
    "__version__",
    "frozen_bn",
]
