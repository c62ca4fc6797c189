"""The SAM optimizer family as ``torch.optim.Optimizer`` wrappers: one :class:`SAM`, a policy, a reuse rule."""

from sharpness.optim.batchnorm import BatchNormStatsGuard, frozen_bn
from sharpness.optim.msam import MSAM, unperturbed_weights
from sharpness.optim.policy import Adaptive, Always, Bernoulli, EveryK, Late, Policy
from sharpness.optim.presets import AESAM, AELookSAM, LateSAM, LookSAM, PeriodicSAM, RandomSAM
from sharpness.optim.reuse import LookSAMReuse
from sharpness.optim.sam import SAM
from sharpness.optim.subset import perturb_subset

__all__ = [
    "AELookSAM",
    "AESAM",
    "Adaptive",
    "Always",
    "BatchNormStatsGuard",
    "Bernoulli",
    "EveryK",
    "Late",
    "LateSAM",
    "LookSAM",
    "LookSAMReuse",
    "MSAM",
    "PeriodicSAM",
    "Policy",
    "RandomSAM",
    "SAM",
    "frozen_bn",
    "perturb_subset",
    "unperturbed_weights",
]
