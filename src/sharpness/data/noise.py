"""Symmetric label noise: a fixed number of labels, each replaced by a uniformly drawn *different* class.

This is the symmetric ("uniform") noise of the label-noise robustness literature, as in the label-noise
experiments of the SAM paper (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021, §3.3: a fraction of the CIFAR training labels is randomly flipped), with two
choices that make the realised noise exactly the requested one:

* exactly ``round(rate * n)`` examples are corrupted, chosen uniformly without replacement (rather than
  flipping each label independently with probability ``rate``);
* a corrupted label is drawn uniformly from the ``num_classes - 1`` *other* classes, so every corrupted
  label really is wrong (drawing from all classes would leave ``1 / num_classes`` of them correct).

All random numbers come from the :class:`torch.Generator` passed in, never from the global RNG.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sharpness.checks import check_integer, check_real

__all__ = ["symmetric_label_noise"]


def symmetric_label_noise(labels: Tensor, rate: float, num_classes: int, generator: torch.Generator) -> Tensor:
    """A copy of ``labels`` (int64, shape ``(n,)``) with exactly ``round(rate * n)`` of them changed.

    Args:
        labels: class labels in ``0..num_classes-1``; not modified.
        rate: fraction to corrupt, ``0 <= rate < 1``.
        num_classes: number of classes, at least 2.
        generator: CPU generator driving which labels change and to what.
    """
    if labels.dim() != 1:
        raise ValueError(f"symmetric_label_noise: labels must be 1-D class indices, got shape {tuple(labels.shape)}")
    num_classes = check_integer(
        num_classes, "num_classes", owner="symmetric_label_noise", low=2, what="needs at least 2 classes"
    )
    rate = check_real(rate, "rate", owner="symmetric_label_noise", low=0.0, high=1.0, high_open=True)
    n = labels.shape[0]
    count = round(rate * n)
    noisy = labels.clone()
    if count == 0:
        return noisy
    index = torch.randperm(n, generator=generator)[:count].to(labels.device)
    offset = torch.randint(1, num_classes, (count,), generator=generator).to(labels.device)  # 1..C-1: never 0
    noisy[index] = (labels[index] + offset) % num_classes
    return noisy
