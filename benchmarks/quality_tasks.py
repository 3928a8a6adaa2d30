"""Procedural image tasks for the quality lab, written as timm/ImageFolder folders.

Each task draws 10 classes of 32x32 RGB images from a seeded generator, with nuisance
variation (position, size, colour, contrast, frequency, phase), clutter and pixel noise,
tuned so a small timm CNN trained from scratch reaches roughly 75-92 % — hard enough that
binarization costs accuracy, unlike the digits. Class identity survives the augmentation
`lr-quant train` applies to an ImageFolder (random resized crop, horizontal flip): every
class is invariant to a left-right mirror and defined by shape or structure, not by scale.

    shapes     disk, ring, square, square outline, triangle, plus, x-cross, diamond,
               two bars, dot pair; random colours on a textured background, occluding lines
    textures   horizontal / vertical stripes, checkerboard, diagonal cross-hatch, dot grid,
               concentric rings, radial spokes, smooth blobs, fine noise, plaid; random
               colours, frequencies, phases and a noise floor

`write_imagefolder(task, root, n_train, n_test, seed)` writes root/train/<class>/*.png and
root/val/<class>/*.png (the layout `--data.dataset imagefolder --data.root` reads) once;
a marker file makes it idempotent.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Callable, Dict, Tuple

import numpy as np

SIZE = 32
_C = np.arange(SIZE) - (SIZE - 1) / 2
YY, XX = np.meshgrid(_C, _C, indexing="ij")


def _colour(rng) -> np.ndarray:
    return rng.uniform(0.0, 1.0, 3)


def _compose(mask: np.ndarray, fg: np.ndarray, bg_img: np.ndarray) -> np.ndarray:
    return bg_img * (1 - mask[..., None]) + fg[None, None, :] * mask[..., None]


def _soft(d: np.ndarray) -> np.ndarray:
    """Anti-aliased inside mask from a signed distance (negative inside)."""
    return np.clip(0.5 - d, 0.0, 1.0)


# -- shapes ---------------------------------------------------------------------------------
def _shape_sdf(label: int, x: np.ndarray, y: np.ndarray, r: float, rng) -> np.ndarray:
    ax, ay = np.abs(x), np.abs(y)
    w = max(1.5, 0.28 * r)   # stroke half-width
    if label == 0:    # disk
        return np.hypot(x, y) - r
    if label == 1:    # ring
        return np.abs(np.hypot(x, y) - 0.8 * r) - w
    if label == 2:    # square
        return np.maximum(ax, ay) - 0.85 * r
    if label == 3:    # square outline
        return np.abs(np.maximum(ax, ay) - 0.8 * r) - w
    if label == 4:    # triangle (apex up; mirror symmetric)
        return np.maximum(np.maximum(-y - 0.8 * r, 0.866 * ax + 0.5 * y - 0.45 * r), -10 * r)
    if label == 5:    # plus
        return np.minimum(np.maximum(ax - w, ay - r), np.maximum(ay - w, ax - r))
    if label == 6:    # x-cross
        u, v = (x + y) / math.sqrt(2), (x - y) / math.sqrt(2)
        au, av = np.abs(u), np.abs(v)
        return np.minimum(np.maximum(au - w, av - r), np.maximum(av - w, au - r))
    if label == 7:    # diamond
        return (ax + ay) / math.sqrt(2) - 0.7 * r
    if label == 8:    # two horizontal bars
        return np.maximum(np.abs(ay - 0.45 * r) - w, ax - r)
    # 9: a pair of dots side by side
    return np.hypot(ax - 0.55 * r, y) - 0.38 * r


def _shapes(label: int, rng) -> np.ndarray:
    bg, fg = _colour(rng), _colour(rng)
    while np.abs(bg - fg).sum() < 0.6:
        fg = _colour(rng)
    # background: two-colour low-frequency texture
    f = rng.uniform(0.05, 0.2)
    t = rng.uniform(0, math.pi)
    wave = 0.5 + 0.5 * np.sin(2 * math.pi * f * (np.cos(t) * XX + np.sin(t) * YY) + rng.uniform(0, 6.3))
    bg2 = _colour(rng)
    img = bg[None, None, :] * (1 - 0.5 * wave[..., None]) + bg2[None, None, :] * 0.5 * wave[..., None]
    r = rng.uniform(6.0, 11.0)
    cx, cy = rng.uniform(-4, 4, 2)
    rot = rng.normal(0, math.radians(10))
    x, y = XX - cx, YY - cy
    x, y = np.cos(rot) * x + np.sin(rot) * y, -np.sin(rot) * x + np.cos(rot) * y
    img = _compose(_soft(_shape_sdf(label, x, y, r, rng)), fg, img)
    for _ in range(rng.integers(1, 4)):   # occluding lines
        t = rng.uniform(0, math.pi)
        off = rng.uniform(-14, 14)
        d = np.abs(np.cos(t) * XX + np.sin(t) * YY - off) - rng.uniform(0.3, 1.0)
        img = _compose(0.8 * _soft(d), _colour(rng), img)
    return img + rng.normal(0, 0.16, img.shape)


# -- textures -------------------------------------------------------------------------------
def _smooth_noise(rng, cutoff: float) -> np.ndarray:
    spec = np.fft.fft2(rng.normal(0, 1, (SIZE, SIZE)))
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(SIZE), np.fft.fftfreq(SIZE), indexing="ij"))
    out = np.real(np.fft.ifft2(spec * (k < cutoff)))
    return out / (out.std() + 1e-8)


def _texture_field(label: int, rng) -> np.ndarray:
    f = rng.uniform(0.12, 0.3)
    ph = rng.uniform(0, 2 * math.pi, 2)
    jitter = rng.normal(0, math.radians(6))
    x = np.cos(jitter) * XX + np.sin(jitter) * YY
    y = -np.sin(jitter) * XX + np.cos(jitter) * YY
    s = lambda u, k=0: np.sin(2 * math.pi * f * u + ph[k])   # noqa: E731
    if label == 0:
        return s(y)
    if label == 1:
        return s(x)
    if label == 2:
        return np.sign(s(x) * s(y, 1)) * 0.8
    if label == 3:
        return np.maximum(s((x + y) / math.sqrt(2)), s((x - y) / math.sqrt(2), 1))
    if label == 4:
        return ((s(x) > 0.6) & (s(y, 1) > 0.6)) * 1.0 - 0.3
    if label == 5:
        return s(np.hypot(x, y))
    if label == 6:
        n = rng.integers(4, 8) * 2
        return np.sin(n * np.arctan2(y, x) + ph[0])
    if label == 7:
        return _smooth_noise(rng, 0.08)
    if label == 8:
        return _smooth_noise(rng, 0.5) * 0.7
    return 0.5 * (s(x) + np.sin(2 * math.pi * 2.1 * f * y + ph[1]))


def _textures(label: int, rng) -> np.ndarray:
    field = _texture_field(label, rng).astype(np.float64)
    field = field / (np.abs(field).max() + 1e-8)
    a, b = _colour(rng), _colour(rng)
    mix = (0.5 + 0.5 * rng.uniform(0.6, 1.0) * field)[..., None]
    img = a[None, None, :] * mix + b[None, None, :] * (1 - mix)
    return img + rng.normal(0, 0.12, img.shape)


TASKS: Dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "shapes": _shapes,
    "textures": _textures,
}


def draw(task: str, n: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 32, 32, 3), labels (n,)) with balanced, shuffled labels."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10)
    images = np.stack([TASKS[task](int(k), rng) for k in labels])
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8), labels


def write_imagefolder(task: str, root, n_train: int = 4400, n_test: int = 1000,
                      seed: int = 0) -> Path:
    """Write the task as root/{train,val}/<class>/<i>.png once (idempotent); returns root."""
    from PIL import Image

    root = Path(root)
    spec = {"task": task, "n_train": n_train, "n_test": n_test, "seed": seed, "size": SIZE}
    marker = root / "task.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return root
    for split, n, s in (("train", n_train, seed), ("val", n_test, seed + 10_000)):
        shutil.rmtree(root / split, ignore_errors=True)   # no stale images of another spec
        images, labels = draw(task, n, s)
        for k in range(10):
            (root / split / f"class_{k}").mkdir(parents=True, exist_ok=True)
        for i, (img, k) in enumerate(zip(images, labels)):
            Image.fromarray(img).save(root / split / f"class_{k}" / f"{i:05d}.png")
    marker.write_text(json.dumps(spec))
    return root
