"""Small helpers shared by the training modules: seeding and the DDP unwrap."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

__all__ = ["seed_everything", "unwrap"]


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (any other model unchanged)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
