"""The presets are SAM subclasses: ``isinstance`` tells them apart, and each is its policy and reuse rule."""

import pytest
import torch

import sharpness
from sharpness.optim.policy import Adaptive, Bernoulli, EveryK, Late
from sharpness.optim.registry import SAM_FAMILY, build_optimizer
from sharpness.optim.reuse import LookSAMReuse

PRESETS = {
    "PeriodicSAM": (EveryK, type(None)),
    "RandomSAM": (Bernoulli, type(None)),
    "LookSAM": (EveryK, LookSAMReuse),
    "AESAM": (Adaptive, type(None)),
    "AELookSAM": (Adaptive, LookSAMReuse),
    "LateSAM": (Late, type(None)),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_is_a_sam_subclass_with_its_policy_and_reuse(name: str) -> None:
    cls = getattr(sharpness, name)
    opt = cls(torch.nn.Linear(3, 2).parameters(), torch.optim.SGD, lr=0.1)
    policy, reuse = PRESETS[name]
    assert isinstance(opt, sharpness.SAM) and type(opt) is cls and issubclass(cls, sharpness.SAM)
    assert type(opt.policy) is policy and type(opt.reuse) is reuse
    assert repr(opt).startswith(f"{name}(base_optimizer=SGD)")
    others = [getattr(sharpness, other) for other in PRESETS if other != name]
    assert not any(isinstance(opt, other) for other in others)


@pytest.mark.parametrize("key", SAM_FAMILY)
def test_the_registry_builds_the_preset_classes(key: str) -> None:
    expected = {"sam": "SAM", "asam": "SAM", "periodicsam": "PeriodicSAM", "randomsam": "RandomSAM",
                "looksam": "LookSAM", "aesam": "AESAM", "aelooksam": "AELookSAM", "latesam": "LateSAM",
                "lateaesam": "LateSAM"}  # fmt: skip
    opt = build_optimizer(key, torch.nn.Linear(3, 2), lr=0.1)
    assert type(opt).__name__ == expected[key]
