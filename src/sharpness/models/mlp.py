"""Multilayer perceptron (fully connected network).

Architecture: ``Flatten -> [Linear(d_in, h_1), act, ..., Linear(h_{k-1}, h_k), act] -> Linear(h_k, num_classes)``
where ``d_in`` is the product of ``input_shape`` and ``act`` is ReLU or tanh. With ``hidden=()`` it is a linear
(multinomial logistic regression) model. The default ``hidden=(256, 256)`` on MNIST-1D is the MLP baseline of
Greydanus, "Scaling down Deep Learning" (2020, arXiv 2011.14439).

Initialisation: PyTorch's default for ``nn.Linear`` (Kaiming-uniform weights with ``a=sqrt(5)``, uniform biases
in ``+-1/sqrt(fan_in)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from sharpness.models._common import as_bool, as_int, as_int_tuple, check_shape

__all__ = ["MLP"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """Fully connected classifier on the flattened input.

    Args:
        input_shape: shape of one example (any number of dimensions; it is flattened).
        num_classes: number of outputs (logits).
        hidden: widths of the hidden layers; a sequence of ints or a comma string such as ``"256,256"``;
            empty for a linear model.
        activation: ``"relu"`` or ``"tanh"``.
        bias: whether the linear layers have biases.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] | str = (256, 256),
        activation: str = "relu",
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.input_shape = check_shape(
            input_shape,
            model="mlp",
            lengths=tuple(range(1, 9)),
            expected="a non-empty tuple such as (40,) or (1, 8, 8)",
        )
        self.num_classes = as_int(num_classes, "num_classes", model="mlp")
        self.hidden = as_int_tuple(hidden, "hidden", model="mlp", allow_empty=True)
        act_name = activation.strip().lower() if isinstance(activation, str) else activation
        if act_name not in _ACTIVATIONS:
            raise ValueError(f"mlp: activation must be one of {', '.join(_ACTIVATIONS)}, got {activation!r}")
        self.activation = act_name
        bias = as_bool(bias, "bias", model="mlp")

        layers: list[nn.Module] = [nn.Flatten(start_dim=1)]
        width = math.prod(self.input_shape)
        for h in self.hidden:
            layers += [nn.Linear(width, h, bias=bias), _ACTIVATIONS[act_name]()]
            width = h
        layers.append(nn.Linear(width, self.num_classes, bias=bias))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
