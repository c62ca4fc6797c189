"""build_model: names, options, errors, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpness.models import CNN, CNN1D, MLP, MODELS, ResNet18, WideResNet, build_model, model_options, parse_model_name
from sharpness.models.wide_resnet import WideBasicBlock

CIFAR = (3, 32, 32)


def test_models_tuple() -> None:
    assert MODELS == ("mlp", "cnn1d", "cnn", "resnet18", "wrn")


@pytest.mark.parametrize(
    ("name", "cls", "shape"),
    [
        ("MLP", MLP, (40,)),
        ("CNN1D", CNN1D, (40,)),
        (" Cnn ", CNN, (1, 8, 8)),
        ("ResNet18", ResNet18, (1, 8, 8)),
        ("WRN-10-1", WideResNet, (1, 8, 8)),
    ],
)
def test_names_are_case_insensitive(name: str, cls: type, shape: tuple[int, ...]) -> None:
    kwargs = {"width": 2} if cls is ResNet18 else {}
    assert type(build_model(name, input_shape=shape, num_classes=3, **kwargs)) is cls


def _blocks_per_group(model: WideResNet) -> list[int]:
    return [sum(isinstance(m, WideBasicBlock) for m in g) for g in (model.block1, model.block2, model.block3)]


def test_wrn_name_parsing() -> None:
    assert parse_model_name("wrn-28-10") == ("wrn", {"depth": 28, "widen_factor": 10})
    assert parse_model_name("WRN-16-4") == ("wrn", {"depth": 16, "widen_factor": 4})
    assert parse_model_name("wrn") == ("wrn", {"depth": 16, "widen_factor": 4})
    assert parse_model_name("cnn") == ("cnn", {})

    model = build_model("wrn-16-4", input_shape=(1, 8, 8), num_classes=10)
    assert (model.depth, model.widen_factor, model.dropout) == (16, 4, 0.0)
    assert _blocks_per_group(model) == [2, 2, 2]
    assert model.fc.in_features == 64 * 4

    model = build_model("wrn-10-1", input_shape=(1, 8, 8), num_classes=10)
    assert (model.depth, model.widen_factor) == (10, 1)
    assert _blocks_per_group(model) == [1, 1, 1]
    assert model.fc.in_features == 64


def test_plain_wrn_defaults_to_wrn_16_4_and_takes_options() -> None:
    model = build_model("wrn", input_shape=(1, 8, 8), num_classes=10)
    assert (model.depth, model.widen_factor) == (16, 4)
    model = build_model("wrn", input_shape=(1, 8, 8), num_classes=10, depth=22, widen_factor=1, dropout=0.3)
    assert (model.depth, model.widen_factor, model.dropout) == (22, 1, 0.3)
    assert _blocks_per_group(model) == [3, 3, 3]
    assert all(m.p == 0.3 for m in model.modules() if isinstance(m, nn.Dropout))
    # String option values (as a command line passes them) are accepted.
    model = build_model("wrn", input_shape=(1, 8, 8), num_classes=10, depth="10", widen_factor="2", dropout="0.1")
    assert (model.depth, model.widen_factor, model.dropout) == (10, 2, 0.1)


def test_wrn_name_with_consistent_or_conflicting_options() -> None:
    model = build_model("wrn-10-1", input_shape=(1, 8, 8), num_classes=10, depth=10, dropout=0.2)
    assert (model.depth, model.widen_factor, model.dropout) == (10, 1, 0.2)
    with pytest.raises(ValueError, match="depth"):
        build_model("wrn-10-1", input_shape=(1, 8, 8), num_classes=10, depth=16)
    with pytest.raises(ValueError, match="widen_factor"):
        build_model("wrn-10-1", input_shape=(1, 8, 8), num_classes=10, widen_factor=2)


@pytest.mark.parametrize("name", ["wrn-20-4", "wrn-4-1", "wrn-0-1", "wrn-27-10"])
def test_wrn_bad_depth(name: str) -> None:
    with pytest.raises(ValueError, match=r"\(depth - 4\) % 6 == 0"):
        build_model(name, input_shape=CIFAR, num_classes=10)


def test_wrn_bad_depth_option_and_width() -> None:
    with pytest.raises(ValueError, match=r"\(depth - 4\) % 6 == 0"):
        build_model("wrn", input_shape=CIFAR, num_classes=10, depth=20)
    with pytest.raises(ValueError, match="widen factor"):
        build_model("wrn-10-0", input_shape=CIFAR, num_classes=10)
    with pytest.raises(ValueError, match="dropout"):
        build_model("wrn", input_shape=CIFAR, num_classes=10, dropout=1.0)


@pytest.mark.parametrize("name", ["vgg16", "resnet", "resnet-18", "wrn-28", "wrn-a-b", "wrn28-10", ""])
def test_unknown_name_lists_valid_names(name: str) -> None:
    with pytest.raises(ValueError, match="unknown model") as info:
        build_model(name, input_shape=CIFAR, num_classes=10)
    message = str(info.value)
    for valid in MODELS:
        assert valid in message
    assert "wrn-D-K" in message


def test_name_must_be_a_string() -> None:
    with pytest.raises(TypeError, match="string"):
        build_model(None, input_shape=CIFAR, num_classes=10)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "option"),
    [("cnn1d", "hidden"), ("mlp", "depth"), ("resnet18", "dropout"), ("wrn-16-4", "width"), ("cnn", "activation")],
)
def test_option_the_model_does_not_accept(name: str, option: str) -> None:
    shape = (40,) if name in ("mlp", "cnn1d") else CIFAR
    with pytest.raises(TypeError, match=f"'{option}'") as info:
        build_model(name, input_shape=shape, num_classes=10, **{option: 1})
    assert name in str(info.value)


def test_model_options() -> None:
    assert model_options("mlp") == ("hidden", "activation", "bias")
    assert model_options("WRN-28-10") == ("depth", "widen_factor", "dropout")


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        ("cnn1d", (1, 8, 8), r"\(L,\) or \(C, L\)"),
        ("cnn1d", (), r"\(L,\) or \(C, L\)"),
        ("cnn1d", (2,), "at least 3"),
        ("cnn", (40,), r"\(C, H, W\)"),
        ("cnn", (1, 4, 4), "at least 8x8"),
        ("resnet18", (1, 40), r"\(C, H, W\)"),
        ("wrn", (3, 32, 32, 1), r"\(C, H, W\)"),
        ("wrn-28-10", (3, 0, 32), r"\(C, H, W\)"),
        ("mlp", (), "non-empty"),
        ("mlp", 40, "non-empty"),
        ("mlp", (40.0,), "positive integers"),
    ],
)
def test_bad_input_shape(name: str, shape: object, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        build_model(name, input_shape=shape, num_classes=10)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        ("mlp", {"hidden": "256,abc"}, "hidden"),
        ("mlp", {"hidden": (256, 0)}, "hidden"),
        ("mlp", {"activation": "sigmoid"}, "activation"),
        ("mlp", {"bias": "maybe"}, "bias"),
        ("cnn1d", {"channels": 0}, "channels"),
        ("cnn", {"channels": ""}, "channels"),
        ("resnet18", {"width": 2.5}, "width"),
    ],
)
def test_bad_option_value(name: str, options: dict, expected: str) -> None:
    shape = (40,) if name in ("mlp", "cnn1d") else CIFAR
    with pytest.raises(ValueError, match=expected):
        build_model(name, input_shape=shape, num_classes=10, **options)


def test_bad_num_classes() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mlp", input_shape=(40,), num_classes=0)


def test_mlp_options() -> None:
    model = build_model("mlp", input_shape=(40,), num_classes=10, hidden="128, 64", activation="TANH", bias="false")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(40, 128), (128, 64), (64, 10)]
    assert all(m.bias is None for m in linears)
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 2
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())


def test_input_shape_may_be_a_list() -> None:
    model = build_model("cnn", input_shape=[1, 8, 8], num_classes=10, channels=[4])
    assert model.input_shape == (1, 8, 8)


@pytest.mark.parametrize(
    ("name", "shape", "options"),
    [
        ("mlp", (40,), {}),
        ("cnn1d", (40,), {}),
        ("cnn", (1, 8, 8), {}),
        ("resnet18", (3, 32, 32), {"width": 4}),
        ("wrn-10-1", (3, 32, 32), {}),
    ],
)
def test_same_seed_same_weights(name: str, shape: tuple[int, ...], options: dict) -> None:
    def build(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return build_model(name, input_shape=shape, num_classes=10, **options).state_dict()

    a, b, c = build(1), build(1), build(2)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
