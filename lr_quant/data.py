"""Offline data: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes).

The one real image data set available without a network; used by the demo and the tests.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["digits_split"]


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
