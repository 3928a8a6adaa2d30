"""A fixed re-quantizer: y = Quant(x - offset), exact on values already on the grid.

FINN form (``lr_quant.convert.finn_form``): a padded max-pool reads an unsigned ternary
tensor {0, 1, 2} (FINN pads a max-pool with the input type's minimum, and its padding layer
takes 0 only); ``GridRequant(offset=1)`` after the pool gives back {-1, 0, +1}, the values of
the signed ternary pooled directly (max commutes with the shift). With ``offset=0`` it
re-quantizes a forked pool output (finn-plus' MakeMaxPoolNHWC rewires the second reader of a
forked MaxPool wrongly). No learned parameter, deterministic in training and eval; export
``Sub -> Quant(scale 1, 2 bit, narrow, signed)``, which FINN turns into a Thresholding layer.
"""

from __future__ import annotations

from brevitas.nn import QuantIdentity
from brevitas.quant.ternary import SignedTernaryActPerTensorConst
from torch import Tensor

__all__ = ["GridRequant"]


class GridRequant(QuantIdentity):
    """``clip(round(x - offset), -1, 1)`` with scale 1 (Brevitas' ternary activation, round
    with a straight-through gradient)."""

    def __init__(self, offset: float = 0.0):
        super().__init__(act_quant=SignedTernaryActPerTensorConst, return_quant_tensor=False)
        self.offset = float(offset)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x - self.offset if self.offset else x)

    def extra_repr(self) -> str:
        return f"offset={self.offset:g}"
