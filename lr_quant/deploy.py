"""Deploy a frozen LR model with bit-packed weights (Triton kernels on GPUs, torch elsewhere).

`pack(model)` swaps every frozen LR layer (and any other discrete-weight layer it can
handle) for `triton_kernels`' PackedLinear / PackedConv2d, which store 1 bit per binary
weight and 2 bits per ternary weight (16-32x smaller than float32) and run the Triton
GEMM kernels on CUDA, the torch reference on the CPU.
"""

from __future__ import annotations

from torch import nn

from .nn.lr_layers import lr_layers

__all__ = ["pack"]


def pack(model: nn.Module, **kwargs):
    """Pack a frozen LR model in place; returns triton_kernels' PackReport.

    Raises if the model has LR layers that are not frozen: pack the discrete network you
    evaluated (`lr_quant.freeze(model)` first), not a snapshot of a training model.
    Keyword arguments go to `triton_kernels.pack_model` (act=..., filter_fn=...).
    """
    from triton_kernels import pack_model

    unfrozen = [name for name, layer in lr_layers(model) if not layer.is_lr_frozen]
    if unfrozen:
        raise ValueError(
            f"LR layers {unfrozen} are not frozen: call lr_quant.freeze(model) before pack")
    model.eval()
    return pack_model(model, **kwargs)
