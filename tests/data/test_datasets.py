"""Data: digits as images, validation carved from train, ImageFolder, CIFAR error path."""

import numpy as np
import pytest
import torch

from lr_quant.data import DataError, build_datasets, dataset_labels, digits_images
from lr_quant.train_config import DataConfig


def test_digits_images_for_timm_models():
    x_train, y_train, x_test, y_test = digits_images(16)
    assert x_train.shape == (1347, 3, 16, 16) and x_test.shape == (450, 3, 16, 16)
    assert torch.equal(x_train[:, 0], x_train[:, 2])
    assert abs(float(x_train.mean())) < 0.1


def test_validation_is_carved_from_train_and_disjoint():
    data = build_datasets(DataConfig(dataset="digits", image_size=8), val_fraction=0.2, seed=1)
    train_idx, val_idx = set(data.train.indices), set(data.val.indices)
    assert not train_idx & val_idx and len(train_idx | val_idx) == 1347
    assert len(data.test) == 450 and data.num_classes == 10
    counts = np.bincount(dataset_labels(data.val), minlength=10)
    assert counts.min() >= 25   # stratified: every class in validation
    again = build_datasets(DataConfig(dataset="digits", image_size=8), 0.2, seed=1)
    assert again.val.indices == data.val.indices
    half = build_datasets(DataConfig(dataset="digits", image_size=8, train_fraction=0.5), 0.2, 1)
    assert abs(len(half.train) - len(data.train) / 2) <= 1


def _write_image_folder(root, classes=("cat", "dog"), per_class=6, size=12):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                pixels[..., c] = 255  # a class signal
                Image.fromarray(pixels).save(d / f"{i}.png")


def test_image_folder(tmp_path):
    _write_image_folder(tmp_path)
    data = build_datasets(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8),
                          val_fraction=0.25, seed=0)
    assert data.num_classes == 2 and len(data.test) == 12
    assert len(data.train) + len(data.val) == 12
    x, y = data.train[0]
    assert x.shape == (3, 8, 8) and y in (0, 1)
    assert data.example_shape == (3, 8, 8)


def test_missing_or_malformed_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(DataConfig(dataset="imagefolder", root=str(tmp_path / "missing")))
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="must contain train/ and val/"):
        build_datasets(DataConfig(dataset="imagefolder", root=str(tmp_path / "flat")))
    with pytest.raises(ValueError, match="needs data.root"):
        DataConfig(dataset="imagefolder")


def test_cifar_without_download_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"cifar10 not found .*--data.download true"):
        build_datasets(DataConfig(dataset="cifar10", root=str(tmp_path)))
