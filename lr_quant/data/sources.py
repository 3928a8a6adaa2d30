"""The raw splits of a data set, opened through ``timm.data.create_dataset``.

``open_source(config)`` gives a :class:`DataSource`: the training and test splits as datasets
of ``(PIL image, label)`` (nothing applied yet: transforms come with the model's data config,
see lr_quant.data.transforms), their labels without decoding images, and the class count.

- ``digits``: the bundled digits as tensors (lr_quant.data.digits).
- ``imagefolder``: timm's folder / tar reader on ``root/train`` and ``root/<test split>``
  (a folder of class sub-folders, or ``<split>.tar``).
- ``cifar10`` / ``cifar100`` (= ``torch/cifar10`` ...) and any ``torch/<name>``: torchvision
  through timm; ``download: true`` needs a network.
- ``hfds/<name or local folder>``: Hugging Face datasets through timm's reader (random access;
  a local folder of parquet or image files reads offline); ``root`` is its cache folder.

Images are decoded here, not by timm's ImageDataset, which skips an unreadable file with a
warning and returns another sample: a corrupt file is an error naming it (images.load_image).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
from torch.utils.data import Dataset, TensorDataset

from .config import DataConfig
from .images import DataError, load_image

__all__ = ["DataSource", "open_source", "labels_of", "EVAL_SPLITS"]

ALIASES = {"cifar10": "torch/cifar10", "cifar100": "torch/cifar100"}
EVAL_SPLITS = ("val", "validation", "test")   # tried in this order when test_split is null


class Images(Dataset):
    """(PIL image, label) items of a timm ImageDataset, decoded by load_image."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.reader = dataset.reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int):
        image, target, *_ = self.reader[index]
        return load_image(image, self.reader.filename(index, absolute=True)), target


@dataclass
class DataSource:
    """train / test splits of (image, label) items; `tensors`: items are prepared tensors
    (digits), no image transform applies."""
    train: Dataset
    test: Dataset
    num_classes: int
    tensors: bool = False


def labels_of(dataset: Dataset) -> np.ndarray:
    """Labels of a source split (TensorDataset, Images, torchvision), without decoding."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].numpy()
    if isinstance(dataset, Images):
        reader = dataset.reader
        if hasattr(reader, "iter_targets"):       # hfds: the label column only
            return np.asarray(list(reader.iter_targets()))
        if getattr(reader, "targets", None) is not None:   # tar
            return np.asarray(reader.targets)
        return np.asarray([target for _, target in reader.samples])
    for name in ("targets", "labels"):
        if hasattr(dataset, name):
            return np.asarray(getattr(dataset, name))
    return np.asarray([dataset[i][1] for i in range(len(dataset))])


def _class_names(dataset: Dataset) -> Optional[List[str]]:
    if isinstance(dataset, Images):
        mapping = getattr(dataset.reader, "class_to_idx", None) or \
            getattr(dataset.reader, "class_name_to_idx", None)
        return sorted(mapping, key=mapping.get) if mapping else None
    return list(getattr(dataset, "classes", None) or []) or None


def _timm_dataset(name: str, root, split: str, config: DataConfig):
    from timm.data import create_dataset

    ds = create_dataset(name, root=root, split=split, search_split=False,
                        download=config.download)
    return Images(ds) if hasattr(ds, "reader") else ds


def _split_path(root: Path, split: str) -> Optional[Path]:
    for path in (root / split, root / f"{split}.tar"):
        if path.exists():
            return path
    return None


def _folder(config: DataConfig) -> DataSource:
    root = Path(config.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root {str(root)!r} does not exist: point --data.root at a folder "
                        f"with train/<class>/<images> and val/<class>/<images>")
    tests = [config.test_split] if config.test_split else list(EVAL_SPLITS)
    train_path = _split_path(root, config.train_split)
    test_path = next((p for p in map(lambda s: _split_path(root, s), tests) if p), None)
    if train_path is None or test_path is None:
        raise DataError(f"{root} must contain {config.train_split}/ and "
                        f"{' or '.join(t + '/' for t in tests)} folders of class sub-folders "
                        f"(the timm / ImageNet layout; or <split>.tar files); found "
                        f"{sorted(p.name for p in root.iterdir())}")
    try:
        train = _timm_dataset("", str(train_path), config.train_split, config)
        test = _timm_dataset("", str(test_path), test_path.stem, config)
    except (FileNotFoundError, RuntimeError, AssertionError) as e:
        raise DataError(f"cannot read the image folders under {root}: {e}") from e
    if _class_names(train) != _class_names(test):
        raise DataError(f"{train_path} and {test_path} have different classes")
    return DataSource(train, test, len(_class_names(train)))


def _torchvision(name: str, config: DataConfig) -> DataSource:
    root = Path(config.root or "~/.cache/lr_quant/data").expanduser()
    label = name.split("/", 1)[1]
    try:
        train = _timm_dataset(name, str(root), config.train_split, config)
        test = _timm_dataset(name, str(root), config.test_split or "validation", config)
    except RuntimeError as e:
        hint = ("" if config.download else
                " Pass --data.download true (needs a network) or point --data.root at a folder "
                "holding the extracted torchvision archive.")
        raise DataError(f"{label} not found under {root}: {e}.{hint}") from e
    except OSError as e:  # URLError and friends: no network
        raise DataError(f"downloading {label} to {root} failed ({e}); without a network, copy "
                        f"the torchvision archive there") from e
    except AssertionError as e:
        raise DataError(f"dataset {name!r}: {e}") from e
    return DataSource(train, test, len(train.classes))


def _hfds(name: str, config: DataConfig) -> DataSource:
    def split(names):
        errors = []
        for s in names:
            try:
                return _timm_dataset(name, config.root, s, config)
            except ValueError as e:   # datasets: Unknown split "validation"
                errors.append(str(e))
        raise DataError(f"dataset {name!r} has none of the splits {list(names)} "
                        f"({errors[-1]}); set --data.train_split / --data.test_split")

    try:
        train = split([config.train_split])
        test = split([config.test_split] if config.test_split else EVAL_SPLITS)
    except ImportError as e:
        raise DataError(f"dataset {name!r} needs Hugging Face datasets: pip install datasets "
                        f"({e})") from e
    except FileNotFoundError as e:
        raise DataError(f"dataset {name!r} not found ({e}); give a local folder of parquet or "
                        f"image files, or a hub name (needs a network)") from e
    classes = _class_names(train)
    if classes != _class_names(test):
        raise DataError(f"dataset {name!r}: the {config.train_split} and test splits have "
                        f"different classes")
    return DataSource(train, test, len(classes))


def open_source(config: DataConfig) -> DataSource:
    """The raw train / test splits of `config.dataset` (see the module docstring)."""
    from .digits import digits_images

    if config.dataset == "digits":
        x_train, y_train, x_test, y_test = digits_images(config.image_size or 32, seed=0)
        return DataSource(TensorDataset(x_train, y_train), TensorDataset(x_test, y_test), 10,
                          tensors=True)
    if config.dataset == "imagefolder":
        return _folder(config)
    name = ALIASES.get(config.dataset, config.dataset)
    if name.partition("/")[0].lower() == "torch":
        return _torchvision(name, config)
    return _hfds(name, config)
