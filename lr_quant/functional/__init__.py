"""Math of LR-nets as plain functions (no Brevitas)."""

from .local_reparam import DEFAULT_EPS, LinearOp, lr_moments, lr_sample, preactivation_snr

__all__ = ["DEFAULT_EPS", "LinearOp", "lr_moments", "lr_sample", "preactivation_snr"]
