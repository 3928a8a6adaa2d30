"""The `data:` section of a recipe: where the images come from and how they are prepared.

Preparation follows timm: ``timm.data.resolve_data_config`` takes input size, mean / std,
interpolation and crop from the model's ``pretrained_cfg`` wherever the recipe leaves a field
null, and ``timm.data.create_transform`` builds the train / eval transforms from them and from
the augmentation fields below (the names of timm's ``train.py`` options). The resolved values
are written back into the recipe a run records (recipe.yaml, checkpoints), so evaluation and
export see exactly what training saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

__all__ = ["DataConfig", "DATASETS", "DATASET_PREFIXES", "RESOLVED_FIELDS"]

# names of their own; any other data set is a timm ``create_dataset`` name with a prefix
DATASETS = ("digits", "imagefolder", "cifar10", "cifar100")
DATASET_PREFIXES = ("torch", "hfds")          # map-style timm data sets
STREAMING_PREFIXES = ("wds", "hfids", "tfds")  # timm's iterable readers (refused, see below)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming", "random")
CROP_MODES = ("center", "squash", "border")
MIXUP_MODES = ("batch", "pair", "elem")
RANDOM_ERASE_MODES = ("const", "rand", "pixel")
# the fields `resolve` fills from the model when the recipe leaves them null
RESOLVED_FIELDS = ("image_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


def _choice(name: str, value, choices) -> None:
    if value is not None and value not in choices:
        from ..schema import did_you_mean
        raise ValueError(f"{name}={value!r} is not one of {tuple(choices)}"
                         f"{did_you_mean(str(value), choices)}")


def _probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _pair(name: str, value, low: float, high: Optional[float]) -> None:
    if value is None:
        return
    if len(value) != 2 or not low < value[0] <= value[1] or (high is not None and value[1] > high):
        raise ValueError(f"{name} must be [min, max] with {low} < min <= max"
                         f"{f' <= {high}' if high is not None else ''}, got {list(value)}")


def check_dataset_name(name: str) -> None:
    """A name `open_source` can read, or a ValueError that says which names exist."""
    prefix, sep, rest = name.partition("/")
    if not sep:
        _choice("dataset", name, DATASETS)
        return
    if prefix.lower() in STREAMING_PREFIXES:
        raise ValueError(
            f"dataset={name!r}: timm's {prefix}/ reader streams samples (an IterableDataset); "
            f"training needs random access (a seeded, resumable sample order and a validation "
            f"split carved from train). Use an hfds/ data set (Hugging Face datasets, read from "
            f"local files offline), imagefolder (a folder or .tar per split) or torch/<name>")
    if prefix.lower() not in DATASET_PREFIXES or not rest:
        raise ValueError(f"dataset={name!r} is not one of {DATASETS} nor a timm data set name "
                         f"'torch/<name>' or 'hfds/<name or local path>'")


@dataclass
class DataConfig:
    """Where the images come from, their preparation and the training augmentation."""
    # digits | imagefolder | cifar10 | cifar100 | torch/<torchvision name> | hfds/<HF data set
    # or local folder of parquet / image files>
    dataset: str = "digits"
    root: Optional[str] = None       # imagefolder: folder with train/ and val/ (folders or .tar)
    download: bool = False           # torch/*: torchvision download (needs a network)
    train_split: str = "train"
    test_split: Optional[str] = None  # null: the first of val, validation, test that exists
    # preparation; null: the model's pretrained_cfg (timm.data.resolve_data_config)
    image_size: Optional[int] = 32
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    interpolation: Optional[str] = None
    crop_pct: Optional[float] = None
    crop_mode: Optional[str] = None
    # training augmentation (timm.data.create_transform); digits: none (tensors)
    scale: List[float] = field(default_factory=lambda: [0.35, 1.0])   # RandomResizedCrop area
    ratio: List[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: Optional[float] = None
    auto_augment: Optional[str] = None   # timm policy string, e.g. rand-m9-mstd0.5, augmix-m5
    re_prob: float = 0.0                 # random erasing
    re_mode: str = "const"
    re_count: int = 1
    # batch mixing (timm.data.Mixup; soft targets, also for the KD teacher's input)
    mixup: float = 0.0                   # alpha of Beta(alpha, alpha); 0: off
    cutmix: float = 0.0
    cutmix_minmax: Optional[List[float]] = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    num_workers: int = 0
    train_fraction: float = 1.0      # subsample the training split (harder settings)

    def __post_init__(self):
        check_dataset_name(self.dataset)
        if self.dataset == "imagefolder" and not self.root:
            raise ValueError("dataset 'imagefolder' needs data.root")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) not in (1, 3):
                raise ValueError(f"{name} needs 1 or 3 values (one per channel), got {value}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be > 0, got {self.std}")
        if self.crop_pct is not None and not 0.0 < self.crop_pct <= 2.0:
            raise ValueError(f"crop_pct must be in (0, 2], got {self.crop_pct}")
        _choice("interpolation", self.interpolation, INTERPOLATIONS)
        _choice("crop_mode", self.crop_mode, CROP_MODES)
        _choice("mixup_mode", self.mixup_mode, MIXUP_MODES)
        _choice("re_mode", self.re_mode, RANDOM_ERASE_MODES)
        _pair("scale", self.scale, 0.0, 1.0)
        _pair("ratio", self.ratio, 0.0, None)
        _pair("cutmix_minmax", self.cutmix_minmax, 0.0, 1.0)
        for name in ("hflip", "vflip", "re_prob", "mixup_prob", "mixup_switch_prob"):
            _probability(name, getattr(self, name))
        for name in ("mixup", "cutmix", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.color_jitter is not None and self.color_jitter < 0:
            raise ValueError(f"color_jitter must be >= 0, got {self.color_jitter}")
        if self.re_count < 1:
            raise ValueError(f"re_count must be >= 1, got {self.re_count}")

    @property
    def mixes_batches(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None
