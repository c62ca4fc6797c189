"""ResNet-18, CIFAR variant.

Reference: He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition" (CVPR 2016); the CIFAR variant of
ResNet-18 used throughout the SAM literature (e.g. the ``kuangliu/pytorch-cifar`` implementation). Architecture,
for base width ``w`` (default 64)::

    Conv2d(in_ch -> w, 3x3, stride 1, padding 1, no bias) -> BatchNorm2d -> ReLU          (no max-pool)
    4 stages of 2 BasicBlocks, widths w, 2w, 4w, 8w, first-block strides 1, 2, 2, 2
    global average pool -> Linear(8w -> num_classes)

BasicBlock: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convolutions (no bias); the shortcut
is the identity, or ``Conv2d(1x1, stride) -> BatchNorm2d`` where the stride or the width changes. With ``w = 64``,
3 input channels and 10 classes it has 11,173,962 parameters.

Initialisation (torchvision's ResNet convention): convolutions Kaiming-normal (``mode="fan_out"``,
``nonlinearity="relu"``); BatchNorm weight 1, bias 0; the final ``nn.Linear`` keeps PyTorch's default.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from sharpness.models._common import as_int, check_shape, init_resnet_

__all__ = ["ResNet18", "BasicBlock"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (post-activation, He et al. 2016)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (3x3 stem, no max-pool, BasicBlock stages [2, 2, 2, 2]).

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: number of outputs (logits).
        width: channels of the first stage (the later stages have 2x, 4x, 8x as many); 64 is the standard model.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.input_shape = check_shape(input_shape, model="resnet18", lengths=(3,), expected="(C, H, W)")
        self.num_classes = as_int(num_classes, "num_classes", model="resnet18")
        self.width = as_int(width, "width", model="resnet18")
        in_channels, w = self.input_shape[0], self.width
        self.conv1 = nn.Conv2d(in_channels, w, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        in_planes = w
        for i, stride in enumerate((1, 2, 2, 2)):
            planes = w * 2**i
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, self.num_classes)
        init_resnet_(self, zero_linear_bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(self.pool(out).flatten(1))
