"""Wide residual network (WRN-D-K).

Reference: Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016); the layout follows the authors' code and
the widely used PyTorch port (``xternalz/WideResNet-pytorch``), whose WRN-28-10 for 10 classes has 36,479,194
parameters. Architecture, for depth ``D`` (with ``(D - 4) % 6 == 0``, ``n = (D - 4) // 6`` blocks per group) and
widen factor ``K``::

    Conv2d(in_ch -> 16, 3x3, padding 1, no bias)
    3 groups of n pre-activation blocks, widths 16K, 32K, 64K, first-block strides 1, 2, 2
    BatchNorm2d -> ReLU -> global average pool -> Linear(64K -> num_classes)

Pre-activation block (no biases in the convolutions)::

    h = relu(bn1(x)); out = conv3x3(h, stride); out = conv3x3(dropout(relu(bn2(out))))
    return out + (x                        if the width and stride are unchanged
                  else conv1x1(h, stride))  # the projection shortcut takes the pre-activated input

Dropout (probability ``dropout``, default 0) sits between the two convolutions of each block, as in the paper.

Initialisation (as in the reference code): convolutions Kaiming-normal (``mode="fan_out"``,
``nonlinearity="relu"``); BatchNorm weight 1, bias 0; the final ``nn.Linear`` has PyTorch's default weight
initialisation and a zero bias.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from sharpness.checks import is_integer
from sharpness.models._common import as_float, as_int, check_shape, from_text, init_resnet_

__all__ = ["WideResNet", "WideBasicBlock", "check_depth"]


def check_depth(depth: object, *, model: str = "wrn") -> int:
    """Return ``depth`` as an int if it is a valid WideResNet depth (10, 16, 22, 28, 34, 40, ...)."""
    d = from_text(depth, int)
    if not is_integer(d) or d < 10 or (d - 4) % 6 != 0:
        raise ValueError(
            f"{model}: depth must satisfy (depth - 4) % 6 == 0 with depth >= 10 (one of 10, 16, 22, 28, 34, 40, ...): "
            f"WRN-D-K has 3 groups of (D - 4) / 6 blocks of two 3x3 convolutions; got {depth!r}"
        )
    return int(d)


class WideBasicBlock(nn.Module):
    """Pre-activation BN-ReLU-conv3x3 block with optional dropout between the convolutions."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(p=dropout)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == planes and stride == 1
        self.shortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu1(self.bn1(x))
        out = self.conv1(h)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(h))


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for (C, H, W) images.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: number of outputs (logits).
        depth: total depth ``D``; ``(D - 4) % 6 == 0`` and ``D >= 10``.
        widen_factor: width multiplier ``K`` (group widths 16K, 32K, 64K).
        dropout: dropout probability inside each block, ``0 <= dropout < 1``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 16,
        widen_factor: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.input_shape = check_shape(input_shape, model="wrn", lengths=(3,), expected="(C, H, W)")
        self.num_classes = as_int(num_classes, "num_classes", model="wrn")
        self.depth = check_depth(depth)
        self.widen_factor = as_int(widen_factor, "widen_factor", model="wrn")
        self.dropout = as_float(dropout, "dropout", model="wrn", low=0.0, high=1.0)
        n = (self.depth - 4) // 6
        widths = [16, 16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor]
        self.conv1 = nn.Conv2d(self.input_shape[0], widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        groups = []
        for i, stride in enumerate((1, 2, 2)):
            blocks = [
                WideBasicBlock(
                    widths[i] if j == 0 else widths[i + 1], widths[i + 1], stride if j == 0 else 1, self.dropout
                )
                for j in range(n)
            ]
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], self.num_classes)
        init_resnet_(self, zero_linear_bias=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn(out))
        return self.fc(self.pool(out).flatten(1))
