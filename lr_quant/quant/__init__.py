"""Brevitas quantizers (injectors) built on lr_quant's math."""

from .weight import (LRBinaryWeightPerChannelFloat, LRBinaryWeightPerTensorConst,
                     LRTernaryWeightPerChannelFloat, LRTernaryWeightPerTensorConst, LRWeightQuant,
                     distribution_from_quantizer, integer_grid, is_lr_weight_quant,
                     lr_weight_quant)

__all__ = [
    "LRWeightQuant",
    "LRBinaryWeightPerTensorConst",
    "LRBinaryWeightPerChannelFloat",
    "LRTernaryWeightPerTensorConst",
    "LRTernaryWeightPerChannelFloat",
    "lr_weight_quant",
    "integer_grid",
    "distribution_from_quantizer",
    "is_lr_weight_quant",
]
