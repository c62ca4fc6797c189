"""The MNIST-1D convolutional network.

Reference: Greydanus, "Scaling down Deep Learning" (2020, arXiv 2011.14439), the ``ConvBase`` model of the
``mnist1d`` repository (there with 25 channels; here ``channels=32`` by default). With SGD it reaches 94.1–94.6 %
mean test accuracy on MNIST-1D (``sharpness compare``, README). Architecture, for ``C`` channels::

    Conv1d(in_ch -> C, kernel 5, stride 2, padding 1), ReLU
    Conv1d(C -> C,     kernel 3, stride 2, padding 1), ReLU
    Conv1d(C -> C,     kernel 3, stride 2, padding 1), ReLU
    Flatten, Linear(C * L_out -> num_classes)

``L_out`` follows from the input length ``L`` (``L -> (L - 3) // 2 + 1 -> (. - 1) // 2 + 1 -> (. - 1) // 2 + 1``;
for ``L = 40``: 40 -> 19 -> 10 -> 5). An input shape ``(L,)`` means one channel: the forward pass adds the channel
dimension to a batch of shape ``(N, L)``.

Normalisation (not in the reference; for SAM-ON, which perturbs only normalisation layers, Mueller et al., NeurIPS
2023, arXiv 2306.04226): ``norm="batch"`` puts ``BatchNorm1d(C)`` between each convolution and its ReLU (the
convolutions then have no bias: BatchNorm's shift replaces it; Ioffe & Szegedy 2015); ``norm="layer"`` puts
``GroupNorm(1, C)`` there, layer normalisation over ``(C, L)`` with a per-channel affine ``γ, β`` (Ba et al. 2016;
Wu & He 2018). The model names ``cnn1d-bn`` and ``cnn1d-ln`` select them. The default ``norm="none"`` is the
reference model, unchanged.

Initialisation: PyTorch's defaults for ``nn.Conv1d``, ``nn.Linear`` (as in the reference) and the normalisation
layers (weight 1, bias 0).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from sharpness.checks import check_choice
from sharpness.models._common import as_int, check_shape

__all__ = ["CNN1D", "NORMS"]

NORMS = ("none", "batch", "layer")
"""``CNN1D``'s ``norm`` choices: none, ``BatchNorm1d`` or layer normalisation (``GroupNorm(1, C)``)."""


def _conv_out(length: int, kernel: int, stride: int = 2, padding: int = 1) -> int:
    return (length + 2 * padding - kernel) // stride + 1


class CNN1D(nn.Module):
    """Three strided 1-D convolutions and a linear head (the MNIST-1D conv net).

    Args:
        input_shape: ``(L,)`` (one channel) or ``(C, L)``; ``L >= 3``.
        num_classes: number of outputs (logits).
        channels: channels of every convolution.
        norm: ``"none"`` (default, the reference), ``"batch"`` (``BatchNorm1d``) or ``"layer"``
            (``GroupNorm(1, C)``) after each convolution.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: int = 32, norm: str = "none") -> None:
        super().__init__()
        self.input_shape = check_shape(input_shape, model="cnn1d", lengths=(1, 2), expected="(L,) or (C, L)")
        self.num_classes = as_int(num_classes, "num_classes", model="cnn1d")
        self.channels = as_int(channels, "channels", model="cnn1d")
        self.norm = check_choice(norm.strip().lower() if isinstance(norm, str) else norm, "norm", NORMS, owner="cnn1d")
        in_channels, length = (1, self.input_shape[0]) if len(self.input_shape) == 1 else self.input_shape
        self._add_channel_dim = len(self.input_shape) == 1
        l_out = _conv_out(_conv_out(_conv_out(length, 5), 3), 3)
        if l_out < 1:
            raise ValueError(f"cnn1d: the input length must be at least 3, got input_shape={input_shape!r}")
        self.out_length = l_out
        c = self.channels
        layers: list[nn.Module] = []
        for c_in, kernel in ((in_channels, 5), (c, 3), (c, 3)):
            layers.append(nn.Conv1d(c_in, c, kernel_size=kernel, stride=2, padding=1, bias=self.norm != "batch"))
            if self.norm == "batch":
                layers.append(nn.BatchNorm1d(c))
            elif self.norm == "layer":
                layers.append(nn.GroupNorm(1, c))
            layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c * l_out, self.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self._add_channel_dim and x.dim() == 2:
            x = x.unsqueeze(1)
        return self.head(self.features(x).flatten(1))
