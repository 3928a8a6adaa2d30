"""Brevitas layers built on lr_quant's quantizers."""

from .lr_layers import (LRQuantConv1d, LRQuantConv2d, LRQuantConv3d, LRQuantLinear,
                        LRWeightMixin, lr_layers, lr_regularization)
from .requant import GridRequant
from .stochastic_sign import StochasticSign, StochasticTernarySign

__all__ = [
    "LRWeightMixin",
    "LRQuantLinear",
    "LRQuantConv1d",
    "LRQuantConv2d",
    "LRQuantConv3d",
    "lr_layers",
    "lr_regularization",
    "StochasticSign",
    "StochasticTernarySign",
    "GridRequant",
]
