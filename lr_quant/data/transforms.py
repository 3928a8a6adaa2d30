"""The model's data config and the train / eval transforms, through timm.

``resolve(config, model)`` fills the recipe's null preparation fields (image size, mean, std,
interpolation, crop_pct, crop_mode) with ``timm.data.resolve_data_config`` from the model's
``pretrained_cfg``; ``image_transform(config, training)`` is ``timm.data.create_transform`` of
a resolved config: train: RandomResizedCrop(scale, ratio) + flips (+ color jitter,
auto-augment, random erasing when set); eval: resize to size / crop_pct, center crop; both
ToTensor + Normalize(mean, std).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

from torch import nn
from torch.utils.data import Dataset

from .config import DataConfig

__all__ = ["resolve", "timm_data_config", "image_transform", "Transformed", "describe"]


def resolve(config: DataConfig, model: Optional[nn.Module] = None) -> DataConfig:
    """`config` with every null preparation field taken from `model`'s pretrained_cfg (timm's
    defaults without a model: ImageNet mean / std, crop_pct 0.875, bicubic, 224)."""
    from timm.data import resolve_data_config

    args: Dict[str, Any] = {"in_chans": 3}
    if config.image_size is not None:
        args["input_size"] = (3, config.image_size, config.image_size)
    for name in ("mean", "std", "interpolation", "crop_pct", "crop_mode"):
        if getattr(config, name) is not None:
            args[name] = getattr(config, name)
    resolved = resolve_data_config(args, model=model)
    _, height, width = resolved["input_size"]
    if height != width:
        raise ValueError(f"the model's input size is {height}x{width}; set data.image_size "
                         f"(square inputs only)")
    return dataclasses.replace(
        config, image_size=int(height), mean=[float(v) for v in resolved["mean"]],
        std=[float(v) for v in resolved["std"]], interpolation=resolved["interpolation"],
        crop_pct=float(resolved["crop_pct"]), crop_mode=resolved.get("crop_mode") or "center")


def timm_data_config(config: DataConfig) -> Dict[str, Any]:
    """A resolved config in timm's data-config form (what timm's own tools take)."""
    return {"input_size": (3, config.image_size, config.image_size),
            "interpolation": config.interpolation, "mean": tuple(config.mean),
            "std": tuple(config.std), "crop_pct": config.crop_pct, "crop_mode": config.crop_mode}


def describe(config: DataConfig, tensors: bool = False) -> str:
    """One line: the resolved preparation, for the log."""
    mean = ", ".join(f"{v:.4g}" for v in config.mean)
    std = ", ".join(f"{v:.4g}" for v in config.std)
    line = (f"data config: input 3x{config.image_size}x{config.image_size}, mean ({mean}), "
            f"std ({std}), {config.interpolation}, crop_pct {config.crop_pct:g} "
            f"({config.crop_mode})")
    if tensors:
        line += f"; {config.dataset} are prepared tensors: only the input size applies"
    return line


def image_transform(config: DataConfig, training: bool):
    """timm.data.create_transform of a resolved config (training: with its augmentation)."""
    from timm.data import create_transform

    common = dict(input_size=(3, config.image_size, config.image_size),
                  interpolation=config.interpolation, mean=tuple(config.mean),
                  std=tuple(config.std), crop_pct=config.crop_pct, crop_mode=config.crop_mode)
    if not training:
        return create_transform(is_training=False, **common)
    return create_transform(
        is_training=True, scale=tuple(config.scale), ratio=tuple(config.ratio),
        hflip=config.hflip, vflip=config.vflip, color_jitter=config.color_jitter,
        auto_augment=config.auto_augment, re_prob=config.re_prob, re_mode=config.re_mode,
        re_count=config.re_count, **common)


class Transformed(Dataset):
    """`source` items (image, label) with `transform` applied to the image."""

    def __init__(self, source: Dataset, transform):
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        image, label = self.source[index]
        return self.transform(image), label
