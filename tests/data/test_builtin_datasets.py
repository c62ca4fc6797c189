"""The generated / bundled data sets through load_dataset: mnist1d, digits, synthetic."""

from __future__ import annotations

import pytest
import torch

from sharpness.data import Augmentation, Dataset, load_dataset, load_mnist1d

pytest.importorskip("mnist1d", reason="needs the mnist1d package: pip install mnist1d")
pytest.importorskip("sklearn", reason="needs scikit-learn: pip install scikit-learn")


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def test_mnist1d_standard_split() -> None:
    data = load_dataset("mnist1d")  # shares load_mnist1d's per-process cache with test_mnist1d.py
    assert data.name == "mnist1d" and data.task == "classification"
    assert data.x_train.shape == (4000, 40) and data.x_test.shape == (1000, 40)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.num_classes == 10 and data.input_shape == (40,) and data.augment is None
    reference = load_mnist1d()
    assert torch.equal(data.x_train, reference.x_train) and torch.equal(data.y_test, reference.y_test)
    assert data.info["data_seed"] == 42
    # the run's seed does not change the examples, only the split / noise applied on top
    assert torch.equal(load_dataset("mnist1d", seed=9).x_test, data.x_test)


def test_mnist1d_options_are_passed_through() -> None:
    data = load_dataset("mnist1d", num_samples=300, train_fraction=0.5)
    assert data.x_train.shape == (150, 40) and data.x_test.shape == (150, 40)
    with pytest.raises(ValueError, match="num_samples"):
        load_dataset("mnist1d", num_samples=5)


def test_digits_shapes_and_standardisation(digits: Dataset) -> None:
    assert digits.x_train.shape == (1438, 1, 8, 8) and digits.x_test.shape == (359, 1, 8, 8)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert digits.num_classes == 10 and digits.input_shape == (1, 8, 8) and digits.augment is None
    assert set(digits.y_train.tolist()) == set(range(10)) == set(digits.y_test.tolist())
    assert abs(digits.x_train.mean().item()) < 1e-5 and abs(digits.x_train.std().item() - 1) < 1e-5
    # undoing the standardisation gives back the original 0..16 grey levels
    mean, std = digits.info["mean"], digits.info["std"]
    for x in (digits.x_train, digits.x_test):
        levels = (x * std + mean) * 16
        assert torch.allclose(levels, levels.round(), atol=1e-4)
        assert levels.round().min() == 0 and levels.round().max() == 16


def test_digits_test_split_is_fixed_across_seeds(digits: Dataset) -> None:
    other = load_dataset("digits", seed=123, val_split=0.2)
    assert torch.equal(other.x_test, digits.x_test) and torch.equal(other.y_test, digits.y_test)
    assert digits.info["split_seed"] == 0
    # the split is a partition of sklearn's 1797 images
    from sklearn.datasets import load_digits

    images = torch.as_tensor(load_digits().images, dtype=torch.float32).flatten(1) / 16
    mean, std = digits.info["mean"], digits.info["std"]
    ours = torch.cat([digits.x_train, digits.x_test]).flatten(1) * std + mean
    assert len(ours) == len(images) == 1797
    assert (
        torch.cdist(ours, images, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values < 1e-4
    ).all()  # every image is one of sklearn's ...
    assert torch.allclose(ours.sum(0), images.sum(0), atol=1e-2)  # ... and, together, all of them


def test_digits_augmentation_is_opt_in_and_never_flips() -> None:
    data = load_dataset("digits", augment=True, cutout=3)
    assert data.augment == Augmentation(crop_padding=1, flip=False, cutout=3)


def test_synthetic_classification_defaults() -> None:
    data = load_dataset("synthetic")
    assert data.task == "classification"
    assert data.x_train.shape == (512, 20) and data.x_test.shape == (256, 20)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.num_classes == 4 and data.input_shape == (20,)
    counts = torch.bincount(data.y_train, minlength=4)
    assert counts.sum() == 512 and (counts > 32).all()  # every class well represented
    assert abs(data.x_train.mean().item()) < 0.05 and abs(data.x_train.std().item() - 1) < 0.05  # N(0, I) inputs


def test_synthetic_seed_and_data_seed() -> None:
    a, b, c = (load_dataset("synthetic", seed=s, n_train=64, n_test=8) for s in (1, 1, 2))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_train, c.x_train)
    fixed = load_dataset("synthetic", seed=2, data_seed=1, n_train=64, n_test=8)
    assert torch.equal(fixed.x_train, a.x_train) and torch.equal(fixed.y_test, a.y_test)


def test_synthetic_linear_teacher_labels_are_linearly_consistent() -> None:
    # A linear teacher with no noise: regression targets are exactly a linear function of the inputs ...
    reg = load_dataset("synthetic", task="regression", hidden=0, noise=0.0, dim=5, num_classes=2, n_train=50)
    assert reg.task == "regression" and reg.y_train.shape == (50, 2) and reg.y_train.dtype == torch.float32
    weights = torch.linalg.lstsq(reg.x_train.double(), reg.y_train.double()).solution
    torch.testing.assert_close(reg.x_test.double() @ weights, reg.y_test.double(), atol=1e-5, rtol=0)
    # ... and the classification labels are their argmax (same seed, same teacher and inputs)
    cls = load_dataset("synthetic", hidden=0, dim=5, num_classes=2, n_train=50)
    assert torch.equal(cls.y_train, reg.y_train.argmax(dim=1)) and torch.equal(cls.x_train, reg.x_train)


def test_synthetic_regression_noise_level() -> None:
    data = load_dataset("synthetic", task="regression", hidden=0, dim=4, noise=0.5, n_train=4000, n_test=8)
    assert data.num_classes == 1 and data.y_train.shape == (4000, 1) and data.input_shape == (4,)
    fit = torch.linalg.lstsq(data.x_train.double(), data.y_train.double())
    residual = data.y_train.double() - data.x_train.double() @ fit.solution
    assert abs(residual.std().item() - 0.5) < 0.03


def test_synthetic_tanh_teacher_is_nonlinear() -> None:
    data = load_dataset("synthetic", task="regression", noise=0.0, dim=3, n_train=500)
    fit = torch.linalg.lstsq(data.x_train.double(), data.y_train.double())
    residual = data.y_train.double() - data.x_train.double() @ fit.solution
    assert residual.std() > 0.01 * data.y_train.std()  # a linear fit cannot reproduce the tanh teacher


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"task": "ranking"}, "task must be one of classification, regression"),
        ({"n_train": 0}, "n_train must be an integer >= 1"),
        ({"dim": 2.5}, "dim must be"),
        ({"num_classes": 1}, "num_classes must be an integer >= 2"),
        ({"noise": -0.1}, "noise must be"),
        ({"hidden": -1}, "hidden must be"),
    ],
)
def test_synthetic_bad_options(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_dataset("synthetic", **options)
