"""Optimizer and schedules.

Optimizer groups: LR logits (logits_lr, no weight decay) and real-valued parameters
(params_lr; weight decay on tensors with ndim > 1 only, not on BN / biases / thresholds).
The learning rate is stepped per optimizer step: linear warmup over `warmup_epochs`, then
cosine to 0, constant, or x0.1 at 50% and 75% ("step"). Sign temperature / noise follow
`ParamSchedule`s over all steps.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List

import torch
from torch import nn

from ..nn.lr_layers import lr_layers
from ..schedule import ParamSchedule
from ..train_config import ScheduleConfig, TrainConfig
from ._util import unwrap

__all__ = ["param_groups", "build_optimizer", "schedule_factor", "make_schedule"]


def param_groups(model: nn.Module, config: TrainConfig) -> List[Dict[str, Any]]:
    """[LR logits (no decay), real params with decay (ndim > 1), real params without decay]."""
    logits, decay, no_decay = [], [], []
    model = unwrap(model)
    lr_params = {id(p) for _, layer in lr_layers(model) for p in layer.lr_parameters()}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in lr_params:
            logits.append(p)
        elif p.ndim > 1:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        dict(params=logits, lr=config.logits_lr, weight_decay=0.0, name="logits_lr"),
        dict(params=decay, lr=config.params_lr, weight_decay=config.weight_decay, name="params"),
        dict(params=no_decay, lr=config.params_lr, weight_decay=0.0, name="params_no_decay"),
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, config)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if config.optimizer == "adam":
        return torch.optim.Adam(groups)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups)
    return torch.optim.SGD(groups, momentum=config.momentum, nesterov=config.momentum > 0)


def schedule_factor(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base learning rates at optimizer step `step` (0-based)."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(total, config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        r = (step - warmup) / max(1, total - warmup)
        if config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, r)))
        if config.schedule == "step":
            return 0.1 ** ((r >= 0.5) + (r >= 0.75))
        return 1.0

    return factor


def make_schedule(config: ScheduleConfig, total_steps: int) -> ParamSchedule:
    """The ParamSchedule of a {start, end, kind} config over `total_steps` steps."""
    return ParamSchedule(config.start, config.end, max(1, total_steps), config.kind)
