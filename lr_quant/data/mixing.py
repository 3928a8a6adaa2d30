"""Batch mixing (mixup / cutmix) through ``timm.data.Mixup``.

``batch_mixer(config, num_classes, label_smoothing)`` returns timm's Mixup, which maps a batch
(x, y) to (lam x + (1 - lam) x[flipped], soft targets) (mixup, Zhang et al. 2018) or pastes a
box of the flipped batch (cutmix, Yun et al. 2019; lam = the kept area), with smoothed one-hot
targets; None when the config mixes nothing. The Trainer feeds the mixed batch to the student
*and* to the KD teacher, and takes cross-entropy against the soft targets.
"""

from __future__ import annotations

from .config import DataConfig

__all__ = ["batch_mixer"]


def batch_mixer(config: DataConfig, num_classes: int, label_smoothing: float = 0.0):
    from timm.data import Mixup

    if not config.mixes_batches:
        return None
    return Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                 cutmix_minmax=config.cutmix_minmax, prob=config.mixup_prob,
                 switch_prob=config.mixup_switch_prob, mode=config.mixup_mode,
                 label_smoothing=label_smoothing, num_classes=num_classes)
