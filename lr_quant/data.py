"""Data sets for fine-tuning: offline digits, ImageFolder, CIFAR-10/100.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), the
  one real image data set available without a network. ``digits_split`` gives the small
  MLP tensors; ``build_datasets`` upsamples them (bilinear) to ``image_size`` as 3-channel
  images, so timm image models run on them (the quick start and the tests).
- ``imagefolder``: torchvision's ImageFolder, timm layout ``root/train/<class>/*.png`` and
  ``root/val/<class>/*`` (or ``root/test``); an unreadable image raises a one-line
  ``DataError`` naming the file (``load_image``), also from DataLoader workers.
- ``cifar10`` / ``cifar100``: torchvision, ``download=True`` needs a network.

The validation split used for model selection (sampled networks, best epoch) is carved
from the *training* data (``val_fraction``, stratified, seeded); the test split is only
ever reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from .train_config import DataConfig

__all__ = ["digits_split", "digits_images", "Datasets", "build_datasets", "DataError",
           "dataset_labels", "load_image"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class DataError(RuntimeError):
    """A data set cannot be found or read (the message says what to do).

    Raised in a DataLoader worker, torch re-raises it in the main process as
    ``DataError("Caught DataError in DataLoader worker process N.\nOriginal Traceback ...")``;
    the message is cut back to the original one line."""

    def __init__(self, message: str = ""):
        if message.startswith("Caught ") and "\nOriginal Traceback" in message:
            last = message.rstrip().rsplit("\n", 1)[-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


def load_image(path: str):
    """An image file as an RGB PIL image (the ImageFolder loader); a file PIL cannot read
    (corrupt, truncated, not an image) raises a one-line DataError naming it."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:
        raise DataError(f"cannot read image {path} ({type(e).__name__}: {e}); delete or replace "
                        f"the file (or re-extract the data set) and run again") from e


def digits_split(
        seed: int = 0,
        test_fraction: float = 0.25,
        flat: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test) of the digits, standardized with train statistics.

    flat=True gives (N, 64) vectors, otherwise (N, 1, 8, 8) images. The split is stratified
    by a seeded permutation per class, so it is identical on every machine.
    """
    from sklearn.datasets import load_digits

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_idx = []
    for label in range(10):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        test_idx.append(idx[: int(round(len(idx) * test_fraction))])
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[np.concatenate(test_idx)] = True
    mean = x[~test_mask].mean()
    std = x[~test_mask].std()
    x = (x - mean) / std
    if not flat:
        x = x.reshape(-1, 1, 8, 8)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    return xt[~test_mask], yt[~test_mask], xt[test_mask], yt[test_mask]


def digits_images(image_size: int = 32, seed: int = 0) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits as (N, 3, image_size, image_size) images (bilinear upsampling, grey in
    all three channels), standardized with train statistics; same split as digits_split."""
    x_train, y_train, x_test, y_test = digits_split(seed=seed, flat=False)

    def up(x):
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear",
                                            align_corners=False)
        return x.expand(-1, 3, -1, -1).contiguous()

    return up(x_train), y_train, up(x_test), y_test


@dataclass
class Datasets:
    """train (minus the validation split), val (carved from train), test; num_classes."""
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    # the same training images without augmentation (BatchNorm re-estimation)
    train_eval: Optional[Dataset] = None
    example_shape: Tuple[int, ...] = (3, 32, 32)


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Labels of a TensorDataset, ImageFolder, CIFAR or a Subset of one (no image decoding)."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices)]
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].numpy()
    for name in ("targets", "labels"):
        if hasattr(dataset, name):
            return np.asarray(getattr(dataset, name))
    return np.asarray([dataset[i][1] for i in range(len(dataset))])


def _stratified_val(labels: np.ndarray, fraction: float, seed: int):
    """(train_indices, val_indices): `fraction` of each class, seeded."""
    if fraction <= 0:
        return np.arange(len(labels)), np.arange(0)
    rng = np.random.default_rng(seed + 12345)
    val = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        val.append(idx[: max(1, int(round(len(idx) * fraction)))])
    val_idx = np.sort(np.concatenate(val))
    mask = np.ones(len(labels), dtype=bool)
    mask[val_idx] = False
    return np.flatnonzero(mask), val_idx


def _subsample(indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    if fraction >= 1.0:
        return indices
    rng = np.random.default_rng(seed + 54321)
    keep = rng.permutation(len(indices))[: max(1, int(round(len(indices) * fraction)))]
    return np.sort(indices[keep])


def _transforms(train: bool, image_size: int, mean, std, cifar: bool):
    from torchvision import transforms as T

    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    if cifar:
        resize = [] if image_size == 32 else [T.Resize(image_size)]
        aug = [T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip()]
        return T.Compose(resize + (aug if train else []) + normalize)
    if train:
        return T.Compose([T.RandomResizedCrop(image_size, scale=(0.35, 1.0)),
                          T.RandomHorizontalFlip()] + normalize)
    return T.Compose([T.Resize(int(round(image_size / 0.875))), T.CenterCrop(image_size)]
                     + normalize)


def _imagefolder(config: DataConfig):
    from torchvision.datasets import ImageFolder

    root = Path(config.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root {str(root)!r} does not exist: point --data.root at a folder "
                        f"with train/<class>/<images> and val/<class>/<images>")
    train_dir = root / "train"
    test_dir = next((root / n for n in ("val", "validation", "test") if (root / n).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(f"{root} must contain train/ and val/ (or test/) folders of class "
                        f"sub-folders (the timm / ImageNet layout); found "
                        f"{sorted(p.name for p in root.iterdir())}")
    try:
        train = ImageFolder(str(train_dir), _transforms(True, config.image_size, IMAGENET_MEAN,
                                                        IMAGENET_STD, False), loader=load_image)
        train_eval = ImageFolder(str(train_dir), _transforms(False, config.image_size,
                                                             IMAGENET_MEAN, IMAGENET_STD, False),
                                 loader=load_image)
        test = ImageFolder(str(test_dir), _transforms(False, config.image_size, IMAGENET_MEAN,
                                                      IMAGENET_STD, False), loader=load_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"cannot read the image folders under {root}: {e}") from e
    if train.classes != test.classes:
        raise DataError(f"{train_dir} and {test_dir} have different classes")
    return train, train_eval, test, len(train.classes)


def _cifar(config: DataConfig):
    from torchvision import datasets

    cls = datasets.CIFAR10 if config.dataset == "cifar10" else datasets.CIFAR100
    root = Path(config.root or "~/.cache/lr_quant/data").expanduser()
    kwargs = dict(root=str(root), download=config.download)
    try:
        train = cls(train=True, transform=_transforms(True, config.image_size, CIFAR_MEAN,
                                                      CIFAR_STD, True), **kwargs)
        train_eval = cls(train=True, transform=_transforms(False, config.image_size, CIFAR_MEAN,
                                                           CIFAR_STD, True), **kwargs)
        test = cls(train=False, transform=_transforms(False, config.image_size, CIFAR_MEAN,
                                                      CIFAR_STD, True), **kwargs)
    except RuntimeError as e:
        hint = ("" if config.download else
                " Pass --data.download true (needs a network) or point --data.root at a folder "
                "holding the extracted torchvision archive.")
        raise DataError(f"{config.dataset} not found under {root}: {e}.{hint}") from e
    except OSError as e:  # URLError and friends: no network
        raise DataError(f"downloading {config.dataset} to {root} failed ({e}); without a "
                        f"network, copy the torchvision archive there") from e
    return train, train_eval, test, len(train.classes)


def build_datasets(config: DataConfig, val_fraction: float = 0.1, seed: int = 0) -> Datasets:
    """Train / validation / test sets of `config`; validation is carved from train."""
    if config.dataset == "digits":
        x_train, y_train, x_test, y_test = digits_images(config.image_size, seed=0)
        train = train_eval = TensorDataset(x_train, y_train)
        test = TensorDataset(x_test, y_test)
        num_classes = 10
    elif config.dataset == "imagefolder":
        train, train_eval, test, num_classes = _imagefolder(config)
    else:
        train, train_eval, test, num_classes = _cifar(config)
    labels = dataset_labels(train)
    train_idx, val_idx = _stratified_val(labels, val_fraction, seed)
    train_idx = _subsample(train_idx, config.train_fraction, seed)
    x0 = train_eval[0][0]
    return Datasets(
        train=Subset(train, train_idx.tolist()),
        val=Subset(train_eval, val_idx.tolist()),
        test=test,
        num_classes=num_classes,
        train_eval=Subset(train_eval, train_idx.tolist()),
        example_shape=tuple(x0.shape))

