"""Architectures of the built-in models: output shapes, exact parameter counts, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpness.models import CNN1D, build_model, count_parameters

MNIST1D = (40,)
DIGITS = (1, 8, 8)
CIFAR = (3, 32, 32)

# Thin variants keep the forward/backward tests fast; the full-width models are only counted.
THIN = {
    "mlp": {"hidden": (16, 16)},
    "cnn1d": {"channels": 8},
    "cnn": {"channels": (4, 8, 8)},
    "resnet18": {"width": 4},
    "wrn-10-1": {},
    "wrn": {"depth": 10, "widen_factor": 1, "dropout": 0.3},
}

CASES = [
    ("mlp", MNIST1D),
    ("mlp", DIGITS),
    ("mlp", CIFAR),
    ("cnn1d", MNIST1D),
    ("cnn1d", (1, 40)),
    ("cnn1d", (2, 40)),
    ("cnn1d", (64,)),
    ("cnn", DIGITS),
    ("cnn", CIFAR),
    ("resnet18", DIGITS),
    ("resnet18", CIFAR),
    ("wrn-10-1", DIGITS),
    ("wrn-10-1", CIFAR),
    ("wrn", CIFAR),
]


def _thin(name: str, input_shape: tuple[int, ...], num_classes: int = 10) -> nn.Module:
    return build_model(name, input_shape=input_shape, num_classes=num_classes, **THIN[name])


@pytest.mark.parametrize(("name", "input_shape"), CASES)
def test_forward_output_shape(name: str, input_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = _thin(name, input_shape, num_classes=7)
    x = torch.randn(3, *input_shape)
    out = model(x)
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()
    model.eval()
    assert model(x).shape == (3, 7)


@pytest.mark.parametrize("name", ["mlp", "cnn1d", "cnn"])
def test_default_width_forward(name: str) -> None:
    shape = MNIST1D if name != "cnn" else DIGITS
    model = build_model(name, input_shape=shape, num_classes=10)
    assert model(torch.randn(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize(("name", "input_shape"), [c for c in CASES if c[1] in (MNIST1D, DIGITS)])
def test_backward_reaches_every_parameter(name: str, input_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = _thin(name, input_shape)
    x, y = torch.randn(4, *input_shape), torch.randint(0, 10, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


# ---- exact parameter counts -------------------------------------------------------------------------------------


def test_mlp_parameter_count_closed_form() -> None:
    model = build_model("mlp", input_shape=MNIST1D, num_classes=10)
    assert count_parameters(model) == 40 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10 == 78_858
    model = build_model("mlp", input_shape=DIGITS, num_classes=10, hidden="128,32", activation="tanh")
    assert count_parameters(model) == 64 * 128 + 128 + 128 * 32 + 32 + 32 * 10 + 10
    model = build_model("mlp", input_shape=CIFAR, num_classes=10, hidden=[], bias=False)
    assert count_parameters(model) == 3 * 32 * 32 * 10


def test_cnn1d_parameter_count_closed_form() -> None:
    def expected(c_in: int, c: int, l_out: int, k: int = 10) -> int:
        return (c_in * c * 5 + c) + 2 * (c * c * 3 + c) + (c * l_out * k + k)

    model = build_model("cnn1d", input_shape=MNIST1D, num_classes=10)
    assert count_parameters(model) == expected(1, 32, 5) == 8_010
    # The reference ConvBase of the mnist1d repository: 25 channels, Linear(125, 10).
    assert count_parameters(build_model("cnn1d", input_shape=MNIST1D, num_classes=10, channels=25)) == 5_210
    assert count_parameters(build_model("cnn1d", input_shape=(3, 64), num_classes=10)) == expected(3, 32, 8)


def test_cnn1d_is_the_mnist1d_architecture() -> None:
    model = build_model("cnn1d", input_shape=MNIST1D, num_classes=10)
    assert isinstance(model, CNN1D)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (1, 32, (5,), (2,), (1,)),
        (32, 32, (3,), (2,), (1,)),
        (32, 32, (3,), (2,), (1,)),
    ]
    assert model.out_length == 5
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 3
    assert (model.head.in_features, model.head.out_features) == (32 * 5, 10)
    # (N, L) and (N, 1, L) inputs give the same logits.
    x = torch.randn(2, 40)
    torch.testing.assert_close(model(x), model(x.unsqueeze(1)))


def test_cnn_parameter_count_closed_form() -> None:
    def expected(c_in: int, channels: tuple[int, ...], bn: bool, k: int = 10) -> int:
        total = 0
        for c in channels:
            total += c_in * c * 9 + (2 * c if bn else c)
            c_in = c
        return total + c_in * k + k

    assert count_parameters(build_model("cnn", input_shape=DIGITS, num_classes=10)) == expected(1, (32, 64, 128), True)
    assert count_parameters(build_model("cnn", input_shape=CIFAR, num_classes=10)) == expected(3, (32, 64, 128), True)
    model = build_model("cnn", input_shape=CIFAR, num_classes=10, channels="32,64", batchnorm=False)
    assert count_parameters(model) == expected(3, (32, 64), False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _resnet18_closed_form(c_in: int, w: int, k: int) -> int:
    total = c_in * w * 9 + 2 * w  # stem conv + BN
    in_planes = w
    for i, stride in enumerate((1, 2, 2, 2)):
        planes = w * 2**i
        total += in_planes * planes * 9 + 2 * planes + planes * planes * 9 + 2 * planes
        if stride != 1 or in_planes != planes:
            total += in_planes * planes + 2 * planes  # 1x1 projection + BN
        total += 2 * (planes * planes * 9 + 2 * planes)
        in_planes = planes
    return total + in_planes * k + k


def _wrn_closed_form(c_in: int, depth: int, widen: int, k: int) -> int:
    n = (depth - 4) // 6
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    total = c_in * 16 * 9
    for i in range(3):
        a, b = widths[i], widths[i + 1]
        total += 2 * a + a * b * 9 + 2 * b + b * b * 9 + (a * b if a != b or i > 0 else 0)
        total += (n - 1) * (2 * b + b * b * 9 + 2 * b + b * b * 9)
    return total + 2 * widths[3] + widths[3] * k + k


def test_resnet18_parameter_count_published() -> None:
    with torch.device("meta"):  # counting needs no storage
        model = build_model("resnet18", input_shape=CIFAR, num_classes=10)
        assert count_parameters(model) == _resnet18_closed_form(3, 64, 10) == 11_173_962
        assert count_parameters(build_model("resnet18", input_shape=CIFAR, num_classes=100)) == 11_220_132
    assert count_parameters(_thin("resnet18", DIGITS)) == _resnet18_closed_form(1, 4, 10)


def test_wrn_parameter_counts_published() -> None:
    with torch.device("meta"):
        model = build_model("wrn-28-10", input_shape=CIFAR, num_classes=10)
        assert count_parameters(model) == _wrn_closed_form(3, 28, 10, 10) == 36_479_194
        # Zagoruyko & Komodakis, Table 4: WRN-16-4 2.7M, WRN-16-8 11.0M, WRN-40-4 8.9M.
        assert count_parameters(build_model("wrn", input_shape=CIFAR, num_classes=10)) == 2_748_890
        assert count_parameters(build_model("wrn-16-8", input_shape=CIFAR, num_classes=10)) == 10_961_370
        assert count_parameters(build_model("wrn-40-4", input_shape=CIFAR, num_classes=10)) == 8_949_210
    for depth, widen in [(10, 1), (16, 4), (22, 2), (40, 4)]:
        with torch.device("meta"):
            model = build_model(f"wrn-{depth}-{widen}", input_shape=DIGITS, num_classes=5)
        assert count_parameters(model) == _wrn_closed_form(1, depth, widen, 5)


def test_count_parameters_trainable_only() -> None:
    model = build_model("mlp", input_shape=MNIST1D, num_classes=10, hidden=(8,))
    model.net[1].weight.requires_grad_(False)
    assert count_parameters(model) == 40 * 8 + 8 + 8 * 10 + 10
    assert count_parameters(model, trainable_only=True) == 8 + 8 * 10 + 10


# ---- initialisation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "wrn"])
def test_resnet_initialisation(name: str) -> None:
    torch.manual_seed(0)
    model = _thin(name, CIFAR)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
        elif isinstance(m, nn.Conv2d) and m.weight.numel() > 1000:
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            std = (2.0 / fan_out) ** 0.5  # Kaiming normal, fan_out, ReLU gain
            assert m.weight.std().item() == pytest.approx(std, rel=0.2)
