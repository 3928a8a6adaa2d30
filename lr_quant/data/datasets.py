"""The train / validation / test sets a run uses: ``build_datasets``.

    data = build_datasets(config, val_fraction, seed, model=fp_model)
    data.train, data.val, data.test, data.config   # config: the resolved data config

The validation split used for model selection (sampled networks, best epoch) is carved from
the *training* data (``val_fraction``, stratified, seeded); the test split is only ever
reported. Train uses the training transform (augmentation), validation, test and the
BatchNorm re-estimation batches (``train_eval``) the eval transform, all from one resolved
config (lr_quant.data.transforms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
from torch import nn
from torch.utils.data import Dataset, Subset

from .config import DataConfig
from .sources import DataSource, labels_of, open_source
from .transforms import Transformed, image_transform, resolve

__all__ = ["Datasets", "build_datasets", "dataset_labels"]


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
    config: Optional[DataConfig] = None   # the resolved data config the sets were built with


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Labels of a data set built here (or a source split), without decoding images."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices)]
    if isinstance(dataset, Transformed):
        return dataset_labels(dataset.source)
    return labels_of(dataset)


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


def build_datasets(config: DataConfig, val_fraction: float = 0.1, seed: int = 0,
                   model: Optional[nn.Module] = None,
                   source: Optional[DataSource] = None) -> Datasets:
    """Train / validation / test sets of `config`, prepared with its data config resolved
    against `model` (lr_quant.data.transforms.resolve); validation is carved from train.
    `source`: the already opened splits (open_source(config)), else they are opened here."""
    config = resolve(config, model)
    if source is None or (source.tensors and source.train[0][0].shape[-1] != config.image_size):
        source = open_source(config)   # digits: made at the resolved size
    if source.tensors:
        train = train_eval = source.train
        test = source.test
    else:
        train = Transformed(source.train, image_transform(config, training=True))
        train_eval = Transformed(source.train, image_transform(config, training=False))
        test = Transformed(source.test, image_transform(config, training=False))
    labels = dataset_labels(source.train)
    train_idx, val_idx = _stratified_val(labels, val_fraction, seed)
    train_idx = _subsample(train_idx, config.train_fraction, seed)
    x0 = train_eval[int(train_idx[0]) if len(train_idx) else 0][0]
    return Datasets(
        train=Subset(train, train_idx.tolist()),
        val=Subset(train_eval, val_idx.tolist()),
        test=test,
        num_classes=source.num_classes,
        train_eval=Subset(train_eval, train_idx.tolist()),
        example_shape=tuple(x0.shape),
        config=config)
