"""scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes): the one real image
data set available without a network (the quick start and the tests).

``digits_split`` gives the small MLP tensors; ``digits_images`` upsamples them (bilinear) to
``image_size`` as 3-channel images, so timm image models run on them. They are tensors already
standardized with the training statistics: no image transform, mean / std or crop applies.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["digits_split", "digits_images"]


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
