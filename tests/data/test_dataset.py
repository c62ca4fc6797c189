"""load_dataset: registry and argument checks, validation split, symmetric label noise, the Dataset container."""

from __future__ import annotations

import math

import pytest
import torch

from sharpness.data import DATASETS, Dataset, load_dataset
from sharpness.data.noise import symmetric_label_noise

pytest.importorskip("sklearn", reason="needs scikit-learn: pip install scikit-learn")

N_DIGITS_TRAIN = 1438


@pytest.fixture(scope="module")
def clean_digits() -> Dataset:
    return load_dataset("digits")


# --- registry and argument checks -------------------------------------------------------------------------


def test_dataset_names() -> None:
    assert DATASETS == ("mnist1d", "digits", "cifar10", "cifar100", "synthetic")


@pytest.mark.parametrize("name", ["mnist", "CIFAR10", "", None])
def test_unknown_name_lists_valid_names(name: object) -> None:
    with pytest.raises(ValueError, match="unknown dataset") as info:
        load_dataset(name)  # type: ignore[arg-type]
    assert "valid names: mnist1d, digits, cifar10, cifar100, synthetic" in str(info.value)


@pytest.mark.parametrize("argument", ["val_split", "label_noise"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, math.nan, math.inf, True, "0.1", None])
def test_out_of_range_fractions_are_rejected_before_loading(argument: str, value: object) -> None:
    # cifar10 without data_dir would fail while loading: the argument check must come first
    with pytest.raises(ValueError, match=rf"{argument} must be a number in \[0, 1\)"):
        load_dataset("cifar10", **{argument: value})


def test_label_noise_on_regression_is_rejected_before_loading() -> None:
    with pytest.raises(ValueError, match="label_noise must be 0 for a regression task"):
        load_dataset("synthetic", task="regression", label_noise=0.1, n_train=-5)  # n_train is checked later
    regression = load_dataset("synthetic", task="regression", label_noise=0.0, n_train=8, n_test=4)
    assert regression.clean_y_train is None and not regression.noisy_mask.any()


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0", 2**63])
def test_bad_seed(seed: object) -> None:
    with pytest.raises(ValueError, match="seed must be an integer"):
        load_dataset("synthetic", seed=seed)  # type: ignore[arg-type]


def test_unknown_option_lists_valid_options() -> None:
    with pytest.raises(ValueError, match="unknown option") as info:
        load_dataset("cifar10", cutuot=8)
    assert "cutuot" in str(info.value) and "valid options: cutout" in str(info.value)
    with pytest.raises(ValueError, match="valid options: num_samples, train_fraction, data_seed"):
        load_dataset("mnist1d", n_train=10)


def test_augment_argument() -> None:
    for name in ("mnist1d", "synthetic"):
        with pytest.raises(ValueError, match="augment=True needs image inputs"):
            load_dataset(name, augment=True)
    with pytest.raises(ValueError, match=r"augment must be True or False \(or None for the data set's default\)"):
        load_dataset("digits", augment="yes")  # type: ignore[arg-type]
    assert load_dataset("synthetic", augment=False, n_train=8, n_test=4).augment is None


# --- validation split -------------------------------------------------------------------------------------


def _match_rows(part: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Index into ``full`` of each row of ``part`` (rows are unique Gaussian vectors here)."""
    distance = torch.cdist(part, full, compute_mode="donot_use_mm_for_euclid_dist")
    assert (distance.min(dim=1).values == 0).all()
    return distance.argmin(dim=1)


def test_val_split_sizes_disjoint_and_covering() -> None:
    full = load_dataset("synthetic", seed=3, n_train=200)
    split = load_dataset("synthetic", seed=3, n_train=200, val_split=0.25)
    assert split.x_val is not None and split.y_val is not None
    assert split.x_train.shape == (150, 20) and split.x_val.shape == (50, 20) and split.y_val.shape == (50,)
    assert split.info["n_val"] == 50 and split.info["n_train"] == 150
    train_idx, val_idx = _match_rows(split.x_train, full.x_train), _match_rows(split.x_val, full.x_train)
    assert sorted(torch.cat([train_idx, val_idx]).tolist()) == list(range(200))  # disjoint, nothing lost
    assert train_idx.tolist() == sorted(train_idx.tolist())  # original order kept
    assert torch.equal(split.y_train, full.y_train[train_idx]) and torch.equal(split.y_val, full.y_train[val_idx])
    assert torch.equal(split.x_test, full.x_test) and torch.equal(split.y_test, full.y_test)


def test_val_split_deterministic_per_seed(clean_digits: Dataset) -> None:
    a = load_dataset("digits", seed=5, val_split=0.1)
    b = load_dataset("digits", seed=5, val_split=0.1)
    c = load_dataset("digits", seed=6, val_split=0.1)
    assert a.x_val is not None and c.x_val is not None
    assert a.x_val.shape[0] == round(0.1 * N_DIGITS_TRAIN) == 144 and a.x_train.shape[0] == N_DIGITS_TRAIN - 144
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_val, c.x_val)
    assert torch.equal(a.x_test, clean_digits.x_test)


def test_no_val_split_gives_none_and_empty_splits_are_rejected() -> None:
    data = load_dataset("synthetic", n_train=10, n_test=4)
    assert data.x_val is None and data.y_val is None and data.info["n_val"] == 0
    with pytest.raises(ValueError, match="leaves an empty validation split"):
        load_dataset("synthetic", n_train=3, n_test=4, val_split=0.1)  # round(0.3) == 0
    with pytest.raises(ValueError, match="leaves an empty training split"):
        load_dataset("synthetic", n_train=1, n_test=4, val_split=0.9)


# --- label noise ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.8])
def test_label_noise_exact_rate_always_wrong_and_test_untouched(clean_digits: Dataset, rate: float) -> None:
    noisy = load_dataset("digits", label_noise=rate, seed=1)
    assert noisy.clean_y_train is not None
    assert torch.equal(noisy.clean_y_train, clean_digits.y_train)
    assert torch.equal(noisy.x_train, clean_digits.x_train)
    changed = noisy.y_train != clean_digits.y_train
    assert torch.equal(noisy.noisy_mask, changed)
    assert int(changed.sum()) == round(rate * N_DIGITS_TRAIN) == noisy.info["noisy_total"]  # every pick is wrong
    assert noisy.y_train.min() >= 0 and noisy.y_train.max() <= 9
    assert torch.equal(noisy.y_test, clean_digits.y_test) and torch.equal(noisy.x_test, clean_digits.x_test)


def test_label_noise_moves_uniformly_to_other_classes(clean_digits: Dataset) -> None:
    noisy = load_dataset("digits", label_noise=0.9, seed=2)
    mask = noisy.noisy_mask
    offset = (noisy.y_train[mask] - clean_digits.y_train[mask]) % 10
    counts = torch.bincount(offset, minlength=10)
    assert counts[0] == 0  # never the original class
    expected = int(mask.sum()) / 9  # about 144 for each of the 9 other classes
    assert ((counts[1:] - expected).abs() < 0.3 * expected).all(), counts.tolist()


def test_label_noise_deterministic_per_seed_and_seeds_differ() -> None:
    a = load_dataset("digits", label_noise=0.2, seed=7)
    b = load_dataset("digits", label_noise=0.2, seed=7)
    c = load_dataset("digits", label_noise=0.2, seed=8)
    assert torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.noisy_mask, c.noisy_mask)
    assert int(a.noisy_mask.sum()) == int(c.noisy_mask.sum())


def test_noise_applies_before_the_split_and_validation_labels_are_noisy(clean_digits: Dataset) -> None:
    rate, seed = 0.3, 4
    noisy = load_dataset("digits", label_noise=rate, val_split=0.2, seed=seed)
    clean = load_dataset("digits", val_split=0.2, seed=seed)
    assert noisy.x_val is not None and clean.x_val is not None and noisy.y_val is not None
    # the same examples are held out with and without noise (independent random streams)
    assert torch.equal(noisy.x_val, clean.x_val) and torch.equal(noisy.x_train, clean.x_train)
    assert noisy.clean_y_train is not None and torch.equal(noisy.clean_y_train, clean.y_train)
    noisy_train = int(noisy.noisy_mask.sum())
    noisy_val = int((noisy.y_val != clean.y_val).sum())
    assert noisy_train == noisy.info["noisy_train"] and noisy_val == noisy.info["noisy_val"]
    assert noisy_train + noisy_val == round(rate * N_DIGITS_TRAIN)  # exact over the full training split
    assert noisy_val > 0.5 * rate * len(noisy.y_val)  # validation labels are noisy too, at about the same rate


def test_noisy_labels_do_not_depend_on_val_split() -> None:
    unsplit = load_dataset("synthetic", label_noise=0.3, seed=2, n_train=100)
    split = load_dataset("synthetic", label_noise=0.3, seed=2, n_train=100, val_split=0.3)
    assert split.x_val is not None and split.y_val is not None
    train_idx, val_idx = _match_rows(split.x_train, unsplit.x_train), _match_rows(split.x_val, unsplit.x_train)
    assert torch.equal(split.y_train, unsplit.y_train[train_idx]) and torch.equal(split.y_val, unsplit.y_train[val_idx])
    assert torch.equal(split.noisy_mask, unsplit.noisy_mask[train_idx])
    assert int(unsplit.noisy_mask.sum()) == 30


def test_no_global_rng_use() -> None:
    torch.manual_seed(0)
    state = torch.get_rng_state()
    load_dataset("digits", label_noise=0.2, val_split=0.1, seed=3)
    load_dataset("synthetic", label_noise=0.2, val_split=0.1, seed=3, n_train=32, n_test=8)
    assert torch.equal(torch.get_rng_state(), state)


def test_symmetric_label_noise_function() -> None:
    labels = torch.arange(10).repeat(10)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(symmetric_label_noise(labels, 0.0, 10, generator), labels)
    for n, rate in ((7, 0.5), (100, 0.33), (3, 0.1)):
        y = labels[:n]
        noisy = symmetric_label_noise(y, rate, 10, generator)
        assert int((noisy != y).sum()) == round(rate * n)
    binary = torch.zeros(50, dtype=torch.long)
    flipped = symmetric_label_noise(binary, 0.4, 2, generator)
    assert int(flipped.sum()) == 20  # with two classes a noisy label is always the other one
    with pytest.raises(ValueError, match="at least 2 classes"):
        symmetric_label_noise(binary, 0.4, 1, generator)


# --- the Dataset container --------------------------------------------------------------------------------


def test_dataset_repr_mask_and_checks(clean_digits: Dataset) -> None:
    assert repr(clean_digits) == (
        "Dataset('digits', task=classification, train=1438, val=none, test=359, input_shape=(1, 8, 8), "
        "num_classes=10, augment=None)"
    )
    assert clean_digits.noisy_mask.dtype == torch.bool and clean_digits.noisy_mask.shape == (1438,)
    assert not clean_digits.noisy_mask.any()
    with pytest.raises(ValueError, match="x_train has 3 examples but y_train has 2"):
        Dataset("x", "classification", torch.zeros(3, 2), torch.zeros(2), None, None, torch.zeros(1, 2),
                torch.zeros(1), 2, (2,))  # fmt: skip
    with pytest.raises(ValueError, match="x_val and y_val"):
        Dataset("x", "classification", torch.zeros(2, 2), torch.zeros(2), torch.zeros(1, 2), None, torch.zeros(1, 2),
                torch.zeros(1), 2, (2,))  # fmt: skip
