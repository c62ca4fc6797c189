"""A small 2-D convolutional network for images (8x8 digits, 32x32 CIFAR, ...).

A plain VGG-style baseline (Simonyan & Zisserman 2015, in miniature; batch normalisation: Ioffe & Szegedy 2015).
Architecture, for ``channels=(c_1, ..., c_k)`` (default ``(32, 64, 128)``)::

    k stages of: Conv2d(3x3, padding 1) -> BatchNorm2d -> ReLU -> MaxPool2d(2)
    global average pool -> Linear(c_k -> num_classes)

Each stage halves the height and width, so the input must be at least ``2**k`` pixels on each side (8x8 digits
with three stages end at 1x1; 32x32 CIFAR at 4x4). With ``batchnorm=False`` the BatchNorm layers are left out and
the convolutions get biases instead.

Initialisation: PyTorch's defaults (``nn.Conv2d``/``nn.Linear``: Kaiming-uniform with ``a=sqrt(5)``;
``nn.BatchNorm2d``: weight 1, bias 0).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from sharpness.models._common import as_bool, as_int, as_int_tuple, check_shape

__all__ = ["CNN"]


class CNN(nn.Module):
    """Conv-BN-ReLU-maxpool stages, global average pooling and a linear head.

    Args:
        input_shape: ``(C, H, W)``, with ``H`` and ``W`` at least ``2 ** len(channels)``.
        num_classes: number of outputs (logits).
        channels: output channels of the stages (one stage each); a sequence of ints or a comma string.
        batchnorm: whether each convolution is followed by ``BatchNorm2d``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] | str = (32, 64, 128),
        batchnorm: bool = True,
    ) -> None:
        super().__init__()
        self.input_shape = check_shape(input_shape, model="cnn", lengths=(3,), expected="(C, H, W)")
        self.num_classes = as_int(num_classes, "num_classes", model="cnn")
        self.channels = as_int_tuple(channels, "channels", model="cnn", allow_empty=False)
        self.batchnorm = as_bool(batchnorm, "batchnorm", model="cnn")
        in_channels, height, width = self.input_shape
        smallest = 2 ** len(self.channels)
        if min(height, width) < smallest:
            raise ValueError(
                f"cnn: {len(self.channels)} pooling stages need images of at least {smallest}x{smallest}, got "
                f"input_shape={input_shape!r}; use fewer channels entries"
            )
        layers: list[nn.Module] = []
        for c in self.channels:
            layers.append(nn.Conv2d(in_channels, c, kernel_size=3, padding=1, bias=not self.batchnorm))
            if self.batchnorm:
                layers.append(nn.BatchNorm2d(c))
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            in_channels = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(in_channels, self.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))
