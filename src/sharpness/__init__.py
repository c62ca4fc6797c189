"""sharpness: sharpness-aware training (the SAM optimizer family) and sharpness analysis for PyTorch."""

from sharpness.optim import SAM, BatchNormStatsGuard, frozen_bn

__version__ = "0.1.0"

__all__ = ["SAM", "BatchNormStatsGuard", "frozen_bn", "__version__"]
