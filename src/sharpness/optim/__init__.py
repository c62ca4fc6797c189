"""The SAM optimizer family as ``torch.optim.Optimizer`` wrappers."""

from sharpness.optim.batchnorm import BatchNormStatsGuard, frozen_bn
from sharpness.optim.sam import SAM

__all__ = ["SAM", "BatchNormStatsGuard", "frozen_bn"]
