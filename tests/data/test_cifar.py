"""CIFAR-10 / CIFAR-100 from a fake local folder in the real pickle format: layout, normalisation, errors."""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from fake_cifar import (
    CIFAR10_PER_BATCH,
    CIFAR10_TEST,
    CIFAR100_TEST,
    CIFAR100_TRAIN,
    FakeCifar,
    write_cifar_batch,
)

from sharpness.data import Augmentation, load_dataset


def _raw_pixels(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Undo the normalisation: (N, 3, 32, 32) float -> uint8 (N, 3072) in the file's layout."""
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    return ((x * s + m) * 255).round().to(torch.uint8).reshape(len(x), -1).numpy()


@pytest.mark.parametrize("use_parent", [False, True])
def test_cifar10_shapes_layout_and_labels(cifar10: FakeCifar, use_parent: bool) -> None:
    data = load_dataset("cifar10", data_dir=cifar10.parent if use_parent else cifar10.folder)
    n_train = 5 * CIFAR10_PER_BATCH
    assert data.name == "cifar10" and data.task == "classification"
    assert data.x_train.shape == (n_train, 3, 32, 32) and data.x_test.shape == (CIFAR10_TEST, 3, 32, 32)
    assert data.x_train.dtype == data.x_test.dtype == torch.float32
    assert data.y_train.dtype == data.y_test.dtype == torch.int64
    assert data.num_classes == 10 and data.input_shape == (3, 32, 32)
    assert data.x_val is None and data.y_val is None and data.clean_y_train is None
    assert data.info["folder"] == str(cifar10.folder)
    # batches concatenated in order 1..5, labels read from b"labels"
    assert data.y_train.tolist() == cifar10.train_labels.tolist()
    assert data.y_test.tolist() == cifar10.test_labels.tolist()
    # pixel layout: first 1024 values = red channel, row-major; the normalisation is exactly invertible
    np.testing.assert_array_equal(_raw_pixels(data.x_train, data.info["mean"], data.info["std"]), cifar10.train_data)
    np.testing.assert_array_equal(_raw_pixels(data.x_test, data.info["mean"], data.info["std"]), cifar10.test_data)


def test_cifar10_per_channel_normalisation_from_training_data(cifar10: FakeCifar) -> None:
    data = load_dataset("cifar10", data_dir=cifar10.folder)
    raw = cifar10.train_data.reshape(-1, 3, 1024).astype(np.float64) / 255
    np.testing.assert_allclose(data.info["mean"], raw.mean(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(data.info["std"], raw.std(axis=(0, 2)), rtol=1e-5)
    assert data.info["mean"][0] < 0.3 < data.info["mean"][1]  # the darker red channel has its own statistics
    torch.testing.assert_close(data.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(data.x_train.std(dim=(0, 2, 3), correction=0), torch.ones(3), atol=1e-5, rtol=0)
    assert data.x_test.mean().abs() < 0.2  # test images use the training statistics, so only roughly centred


def test_cifar_augmentation_default_on_and_configurable(cifar10: FakeCifar) -> None:
    assert load_dataset("cifar10", data_dir=cifar10.folder).augment == Augmentation(crop_padding=4, flip=True)
    assert load_dataset("cifar10", data_dir=cifar10.folder, augment=False).augment is None
    with_cutout = load_dataset("cifar10", data_dir=cifar10.folder, cutout=8)
    assert with_cutout.augment == Augmentation(crop_padding=4, flip=True, cutout=8)
    assert with_cutout.info["augment"] == "Augmentation(crop_padding=4, flip=True, cutout=8)"
    with pytest.raises(ValueError, match="cutout=8 needs augmentation"):
        load_dataset("cifar10", data_dir=cifar10.folder, augment=False, cutout=8)


@pytest.mark.parametrize("use_parent", [False, True])
def test_cifar100_fine_labels(cifar100: FakeCifar, use_parent: bool) -> None:
    data = load_dataset("cifar100", data_dir=cifar100.parent if use_parent else cifar100.folder)
    assert data.x_train.shape == (CIFAR100_TRAIN, 3, 32, 32) and data.x_test.shape == (CIFAR100_TEST, 3, 32, 32)
    assert data.num_classes == 100 and data.input_shape == (3, 32, 32)
    assert data.y_train.tolist() == cifar100.train_labels.tolist()  # fine labels, not coarse ones
    assert data.y_train.max() == 99
    assert data.y_test.tolist() == cifar100.test_labels.tolist()
    np.testing.assert_array_equal(_raw_pixels(data.x_train, data.info["mean"], data.info["std"]), cifar100.train_data)


def test_cifar_with_validation_split_and_label_noise(cifar10: FakeCifar) -> None:
    data = load_dataset("cifar10", data_dir=cifar10.folder, val_split=0.25, label_noise=0.5, seed=3)
    assert data.x_train.shape[0] == 15 and data.x_val is not None and data.x_val.shape[0] == 5
    noisy_val = data.info["noisy_val"]
    assert int(data.noisy_mask.sum()) + noisy_val == 10  # exactly half of the 20 training labels
    assert data.y_test.tolist() == cifar10.test_labels.tolist()


def test_missing_data_dir_names_the_flag_and_files() -> None:
    with pytest.raises(ValueError, match="--data-dir") as info:
        load_dataset("cifar10")
    for name in ("data_batch_1", "data_batch_5", "test_batch", "cifar-10-batches-py"):
        assert name in str(info.value)
    with pytest.raises(ValueError, match="--data-dir") as info:
        load_dataset("cifar100")
    assert "train, test" in str(info.value) and "cifar-100-python" in str(info.value)


def test_nonexistent_folder(tmp_path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_dataset("cifar10", data_dir=missing)


def test_missing_file_is_named_with_the_folder(make_cifar10: Callable[[], FakeCifar]) -> None:
    fake = make_cifar10()
    (fake.folder / "data_batch_3").unlink()
    for data_dir in (fake.folder, fake.parent):
        with pytest.raises(FileNotFoundError) as info:
            load_dataset("cifar10", data_dir=data_dir)
        message = str(info.value)
        assert f"missing data_batch_3 in {fake.folder}" in message
        assert "data_batch_1," not in message.split(" in ")[0]  # only the missing file is listed as missing


def test_empty_folder_lists_every_expected_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar100", data_dir=tmp_path)
    assert f"missing train, test in {tmp_path}" in str(info.value)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"this is not a pickle", "not a valid CIFAR pickle"),
        (None, "not a valid CIFAR pickle"),  # truncated
        (pickle.dumps([1, 2, 3]), "holds a list, expected a dict"),
        (pickle.dumps({b"labels": [0] * 6}), "has no 'data' entry"),
        (pickle.dumps({b"data": np.zeros((6, 3072), np.uint8)}), "has no 'labels' entry"),
        (pickle.dumps({b"data": np.zeros((6, 1024), np.uint8), b"labels": [0] * 6}), r"shape \(N, 3072\)"),
        (pickle.dumps({b"data": np.zeros((6, 3072), np.float32), b"labels": [0] * 6}), "must be a uint8 array"),
        (pickle.dumps({b"data": np.zeros((6, 3072), np.uint8), b"labels": [0] * 5}), "must hold 6 integer labels"),
        (pickle.dumps({b"data": np.zeros((6, 3072), np.uint8), b"labels": [0, 1, 2, 3, 4, 10]}), r"in 0\.\.9"),
    ],
)
def test_corrupt_or_malformed_pickle_names_the_file(
    make_cifar10: Callable[[], FakeCifar], content: bytes | None, problem: str
) -> None:
    fake = make_cifar10()
    target = fake.folder / "test_batch"
    target.write_bytes(target.read_bytes()[:100] if content is None else content)
    with pytest.raises(ValueError, match=problem) as info:
        load_dataset("cifar10", data_dir=fake.folder)
    assert str(target) in str(info.value)


class _Exploit:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # unpickling with plain pickle.load would create a folder
        import os

        return (os.mkdir, (self.path,))


def test_pickle_that_would_run_code_is_refused(make_cifar10: Callable[[], FakeCifar]) -> None:
    fake = make_cifar10()
    marker = fake.parent / "pwned"
    (fake.folder / "data_batch_2").write_bytes(pickle.dumps({b"data": _Exploit(str(marker)), b"labels": [0]}))
    with pytest.raises(ValueError, match="data_batch_2.*unexpected object"):
        load_dataset("cifar10", data_dir=fake.folder)
    assert not marker.exists()


def test_python3_str_keys_are_accepted(make_cifar10: Callable[[], FakeCifar]) -> None:
    fake = make_cifar10()
    data = np.full((2, 3072), 7, np.uint8)
    (fake.folder / "test_batch").write_bytes(pickle.dumps({"data": data, "labels": [3, 4]}))
    loaded = load_dataset("cifar10", data_dir=fake.folder)
    assert loaded.y_test.tolist() == [3, 4] and loaded.x_test.shape == (2, 3, 32, 32)
    write_cifar_batch(fake.folder / "test_batch", data, [5, 6], "labels")
    assert load_dataset("cifar10", data_dir=fake.folder).y_test.tolist() == [5, 6]
