"""Models shared by the benchmarks."""

from __future__ import annotations

from torch import nn


def build_cnn(classes: int = 10) -> nn.Module:
    """A small CNN for 3x32x32 inputs: two conv-BN-ReLU-maxpool stages (3->32->64 channels), linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, classes),
    )
