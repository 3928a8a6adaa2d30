"""Freeze an LR model to a discrete network, in place.

Every LR layer keeps its module and parameters (no copy of the model): its materialized
weight becomes the mode of its distribution (default) or one sample, and the layer is
flagged frozen, so it computes with those discrete weights in train() and eval() alike
(BatchNorm statistics can then be re-estimated on the discrete network). The frozen
layers are plain Brevitas binary / ternary layers as far as inference and QONNX export
are concerned. `unfreeze` returns to LR training.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .nn.lr_layers import lr_layers

__all__ = ["freeze", "unfreeze", "is_frozen"]


@torch.no_grad()
def freeze(model: nn.Module, how: str = "mode", seed: Optional[int] = None) -> nn.Module:
    """Fix the discrete weights of every LR layer of `model`; returns `model`.

    Args:
        how: "mode" (most probable value of each weight) or "sample" (one draw per weight).
        seed: seed of the draw for how="sample" (layers are sampled in module order, so a
            seed names one discrete network).
    """
    layers = lr_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LR layers to freeze")
    if how not in ("mode", "sample"):
        raise ValueError(f"freeze how={how!r}: choose 'mode' or 'sample'")
    if how == "mode" and seed is not None:
        raise ValueError("seed only applies to how='sample'")
    generators = {}
    for _, layer in layers:
        generator = None
        if how == "sample":
            device = layer.weight_logits.device
            if device not in generators:
                generators[device] = torch.Generator(device=device)
                if seed is None:
                    generators[device].seed()
                else:
                    generators[device].manual_seed(seed)
            generator = generators[device]
        layer.freeze(how, generator=generator)
    return model


@torch.no_grad()
def unfreeze(model: nn.Module) -> nn.Module:
    """Return every LR layer of `model` to LR training; returns `model`."""
    for _, layer in lr_layers(model):
        layer.unfreeze()
    return model


def is_frozen(model: nn.Module) -> bool:
    """True when `model` has LR layers and all of them are frozen."""
    layers = lr_layers(model)
    return bool(layers) and all(layer.is_lr_frozen for _, layer in layers)
