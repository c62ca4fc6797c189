"""Built-in models of the ``sharpness`` command line: build one by name with :func:`build_model`.

Names (case-insensitive), with the ``input_shape`` (one example, no batch dimension) each model takes:

* ``mlp``: :class:`MLP`, fully connected, hidden widths ``(256, 256)`` by default; any shape (it flattens).
* ``cnn1d``: :class:`CNN1D`, the MNIST-1D conv net (Greydanus 2020); ``(L,)`` or ``(C, L)``. ``cnn1d-bn`` /
  ``cnn1d-ln``: the same with ``BatchNorm1d`` / layer normalisation (``GroupNorm(1, C)``) after each convolution.
* ``cnn``: :class:`CNN`, conv-BN-ReLU-maxpool stages with ``(32, 64, 128)`` channels; ``(C, H, W)``.
* ``resnet18``: :class:`ResNet18`, CIFAR ResNet-18 (He et al. 2016), 11,173,962 parameters; ``(C, H, W)``.
* ``wrn`` / ``wrn-D-K``: :class:`WideResNet` (Zagoruyko & Komodakis 2016); plain ``wrn`` is WRN-16-4 (CPU-friendly,
  2,748,890 parameters), ``wrn-28-10`` the 36,479,194-parameter model; ``(C, H, W)``.

Parameter counts are for 3 x 32 x 32 inputs and 10 classes. Normalisation layers (for SAM-ON's ``--perturb norm``):
``cnn``, ``resnet18``, ``wrn`` (BatchNorm2d), ``cnn1d-bn``, ``cnn1d-ln``; ``mlp`` and ``cnn1d`` have none.

Example::

    model = build_model("wrn-16-4", input_shape=(3, 32, 32), num_classes=10, dropout=0.3)
    count_parameters(model)  # 2,748,890
"""

from sharpness.models.cnn import CNN
from sharpness.models.cnn1d import CNN1D
from sharpness.models.mlp import MLP
from sharpness.models.registry import (
    MODELS,
    NORMALISED_MODELS,
    build_model,
    count_parameters,
    has_normalisation,
    model_options,
    parse_model_name,
)
from sharpness.models.resnet18 import ResNet18
from sharpness.models.wide_resnet import WideResNet

__all__ = [
    "MODELS",
    "NORMALISED_MODELS",
    "build_model",
    "has_normalisation",
    "count_parameters",
    "model_options",
    "parse_model_name",
    "MLP",
    "CNN1D",
    "CNN",
    "ResNet18",
    "WideResNet",
]
