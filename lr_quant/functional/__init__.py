"""Math of LR-nets as plain functions (no Brevitas)."""

from .local_reparam import DEFAULT_EPS, LinearOp, lr_moments, lr_sample

__all__ = ["DEFAULT_EPS", "LinearOp", "lr_moments", "lr_sample"]
