"""Batched image augmentation: random crop with zero padding, random horizontal flip, optional cutout.

This is the "standard" CIFAR augmentation used by ResNet training recipes (He et al., "Deep Residual Learning
for Image Recognition", 2016, §4.2: pad 4 pixels, random 32x32 crop, random horizontal flip) and by the SAM
paper's CIFAR experiments (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021), optionally with cutout (DeVries & Taylor, "Improved Regularization of
Convolutional Neural Networks with Cutout", 2017, arXiv 1708.04552).

:class:`Augmentation` works on a whole batch ``(B, C, H, W)`` at once with tensor operations (no Python loop
over examples), draws every random number from the :class:`torch.Generator` it is given (never the global
RNG), and so is deterministic given the generator's state. Apply it to *normalised* training batches: the
zero padding and the cutout hole are then at the per-channel mean, as in the references.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sharpness.checks import check_bool, check_integer

__all__ = ["Augmentation"]


@dataclass(frozen=True)
class Augmentation:
    """Random crop (zero padding), random horizontal flip and optional cutout for a batch of images.

    Args:
        crop_padding: pixels of zero padding on each side before a random crop back to the input size, so
            the content moves by at most ``crop_padding`` pixels in each direction; 0 disables cropping.
        flip: flip each image left-right with probability 1/2.
        cutout: side of the square hole set to zero (DeVries & Taylor 2017); 0 disables it. As in the
            reference implementation, the hole's centre is uniform over the image and the hole is clipped at
            the border, so a hole near an edge is smaller than ``cutout x cutout``.

    Call it as ``augmentation(x, generator)`` with ``x`` of shape ``(B, C, H, W)``; it returns a new tensor
    of the same shape, dtype and device (``x`` is never modified).
    """

    crop_padding: int = 4
    flip: bool = True
    cutout: int = 0

    def __post_init__(self) -> None:
        for name in ("crop_padding", "cutout"):
            object.__setattr__(self, name, check_integer(getattr(self, name), name, owner="Augmentation", low=0))
        object.__setattr__(self, "flip", check_bool(self.flip, "flip", owner="Augmentation", error=ValueError))

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"Augmentation expects a batch of images (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            return x.clone()
        if self.crop_padding > 0:
            x = _random_crop(x, self.crop_padding, generator)
        if self.flip:
            x = _random_flip(x, generator)
        if self.cutout > 0:
            x = _cutout(x, self.cutout, generator)
        if not self.crop_padding and not self.flip and not self.cutout:
            x = x.clone()
        return x

    def __repr__(self) -> str:
        return f"Augmentation(crop_padding={self.crop_padding}, flip={self.flip}, cutout={self.cutout})"


def _randint(high: int, size: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """``size`` integers uniform in ``[0, high)``, drawn on the generator's device and moved to ``device``."""
    return torch.randint(high, (size,), generator=generator, device=generator.device).to(device)


def _random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    batch, _, height, width = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))  # zeros
    top = _randint(2 * padding + 1, batch, generator, x.device)
    left = _randint(2 * padding + 1, batch, generator, x.device)
    rows = top[:, None] + torch.arange(height, device=x.device)  # (B, H)
    cols = left[:, None] + torch.arange(width, device=x.device)  # (B, W)
    index = torch.arange(batch, device=x.device)[:, None, None]
    # Advanced indices separated by a slice: the indexed dimensions come first -> (B, H, W, C).
    return padded[index, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def _random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    flip = _randint(2, x.shape[0], generator, x.device).bool()
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _cutout(x: Tensor, size: int, generator: torch.Generator) -> Tensor:
    batch, _, height, width = x.shape
    cy = _randint(height, batch, generator, x.device)
    cx = _randint(width, batch, generator, x.device)
    # Hole rows [cy - size//2, cy - size//2 + size), clipped to the image; likewise for columns.
    y0 = cy - size // 2
    x0 = cx - size // 2
    rows = torch.arange(height, device=x.device)[None, :]
    cols = torch.arange(width, device=x.device)[None, :]
    in_rows = (rows >= y0[:, None]) & (rows < y0[:, None] + size)  # (B, H)
    in_cols = (cols >= x0[:, None]) & (cols < x0[:, None] + size)  # (B, W)
    hole = in_rows[:, :, None] & in_cols[:, None, :]  # (B, H, W)
    return x.masked_fill(hole[:, None], 0)
