"""cnn1d's normalisation option (``norm``, the names cnn1d-bn / cnn1d-ln) and which built-in models have one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpness.models import CNN1D, NORMALISED_MODELS, build_model, has_normalisation, parse_model_name


def test_the_default_cnn1d_is_the_reference_model() -> None:
    model = build_model("cnn1d", input_shape=(40,), num_classes=10)
    assert [name for name, _ in model.named_parameters()] == [
        "features.0.weight", "features.0.bias", "features.2.weight", "features.2.bias",
        "features.4.weight", "features.4.bias", "head.weight", "head.bias",
    ]  # fmt: skip
    assert model.norm == "none" and not any(isinstance(m, (nn.BatchNorm1d, nn.GroupNorm)) for m in model.modules())


@pytest.mark.parametrize(
    ("name", "layer", "conv_bias"), [("cnn1d-bn", nn.BatchNorm1d, False), ("CNN1D-LN", nn.GroupNorm, True)]
)
def test_normalised_variants(name: str, layer: type[nn.Module], conv_bias: bool) -> None:
    torch.manual_seed(0)
    model = build_model(name, input_shape=(40,), num_classes=10, channels=8)
    norms = [m for m in model.modules() if isinstance(m, layer)]
    assert len(norms) == 3 and all(m.weight.shape == (8,) for m in norms)
    assert all((c.bias is not None) == conv_bias for c in model.modules() if isinstance(c, nn.Conv1d))
    assert model(torch.randn(5, 40)).shape == (5, 10)
    assert has_normalisation(name)


def test_norm_option_and_name_checks() -> None:
    assert parse_model_name("cnn1d-bn") == ("cnn1d", {"norm": "batch"})
    assert build_model("cnn1d", input_shape=(40,), num_classes=3, norm="layer").norm == "layer"
    with pytest.raises(ValueError, match="cnn1d: unknown norm 'group'; valid: none, batch, layer"):
        CNN1D((40,), 3, norm="group")
    with pytest.raises(ValueError, match="model 'cnn1d-bn' fixes norm=batch"):
        build_model("cnn1d-bn", input_shape=(40,), num_classes=3, norm="layer")
    with pytest.raises(ValueError, match="cnn1d-bn, cnn1d-ln"):
        parse_model_name("cnn1d-gn")


@pytest.mark.parametrize(
    ("name", "has"), [("mlp", False), ("cnn1d", False), ("cnn", True), ("resnet18", True), ("wrn-16-4", True)]
)
def test_which_built_in_models_have_normalisation_layers(name: str, has: bool) -> None:
    assert has_normalisation(name) is has
    shape = (40,) if name in ("mlp", "cnn1d") else (3, 8, 8)
    model = build_model(name, input_shape=shape, num_classes=3, **({"width": 2} if name == "resnet18" else {}))
    found = any(isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) for m in model.modules())
    assert found is has and (name in NORMALISED_MODELS or name.startswith("wrn")) is has
