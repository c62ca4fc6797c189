"""The SAM optimizer family as ``torch.optim.Optimizer`` wrappers: one :class:`SAM`, a policy, a reuse rule."""

from sharpness.optim.batchnorm import BatchNormStatsGuard, frozen_bn
from sharpness.optim.policy import Adaptive, Always, Bernoulli, EveryK, Policy
from sharpness.optim.presets import AESAM, AELookSAM, LookSAM, PeriodicSAM, RandomSAM
from sharpness.optim.reuse import LookSAMReuse
from sharpness.optim.sam import SAM

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
    "Policy",
    "RandomSAM",
    "SAM",
    "frozen_bn",
]
