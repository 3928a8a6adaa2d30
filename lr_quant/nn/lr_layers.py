"""LR layers: Brevitas QuantLinear / QuantConv1d/2d/3d subclasses whose weights are
distributions (the behaviour, parameters and forward are those of
:class:`.lr_weight.LRWeightMixin`; see its module docstring).

The explicit constructor signatures are Brevitas' plus ``lr_p_min``, ``lr_p_max``,
``lr_eps``, ``lr_output_moments``: Brevitas' ``layerwise_quantize`` filters the kwargs it
passes by the constructor's signature. Strided ``padding='same'`` pads by constants
computed from the input size, so that it exports as a static Pad.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from brevitas.nn import QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear
from torch import Tensor, nn

from ..distributions import DEFAULT_P_MAX, DEFAULT_P_MIN
from ..functional import DEFAULT_EPS
from ..quant.weight import LRBinaryWeightPerTensorConst
from .lr_weight import LRWeightMixin

__all__ = [
    "LRWeightMixin",
    "LRQuantLinear",
    "LRQuantConv1d",
    "LRQuantConv2d",
    "LRQuantConv3d",
    "lr_layers",
    "lr_regularization",
]

def _no_meta(device):
    """Brevitas' ParameterScaling cannot be built on the meta device (it calls .item()):
    build on the CPU; :meth:`LRWeightMixin._finish_init` then empties it onto meta."""
    return None if device is not None and torch.device(device).type == "meta" else device


class LRQuantLinear(LRWeightMixin, QuantLinear):
    """Linear layer with LR-trained discrete weights (see module docstring)."""

    def __init__(
            self,
            in_features: int,
            out_features: int,
            bias: Optional[bool] = True,
            weight_quant=LRBinaryWeightPerTensorConst,
            bias_quant=None,
            input_quant=None,
            output_quant=None,
            return_quant_tensor: bool = False,
            lr_p_min: float = DEFAULT_P_MIN,
            lr_p_max: float = DEFAULT_P_MAX,
            lr_eps: float = DEFAULT_EPS,
            lr_output_moments: bool = False,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            **kwargs) -> None:
        QuantLinear.__init__(
            self, in_features, out_features, bias, weight_quant=weight_quant,
            bias_quant=bias_quant, input_quant=input_quant, output_quant=output_quant,
            return_quant_tensor=return_quant_tensor, device=_no_meta(device), dtype=dtype,
            **kwargs)
        self._init_lr(lr_p_min, lr_p_max, lr_eps, lr_output_moments)
        self._finish_init(device)

    @staticmethod
    def _float_class():
        return nn.Linear

    @staticmethod
    def _geometry_kwargs(module):
        return dict(in_features=module.in_features, out_features=module.out_features)


def _same_pad(x: Tensor, weight: Tensor, stride, dilation) -> List[int]:
    """F.pad argument for TF 'SAME' with stride > 1 (Brevitas' split: pad // 2 before,
    the rest after, as timm's pad_same), from the input size read as Python ints."""
    pad = []
    for i, k, s, d in zip(x.shape[2:], weight.shape[2:], stride, dilation):
        i, k = int(i), int(k)
        total = max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
        pad = [total // 2, total - total // 2] + pad     # F.pad lists the last dim first
    return pad


class _LRQuantConvNd(LRWeightMixin):

    def _same_zeros_pad_stride(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]):
        """Brevitas' padding='same' with stride > 1, with the pad as constants.

        Brevitas reads the input size as traced values, so the TorchScript export
        computes the pad in the graph as ``const - Shape(x)[i]``. When the shape of x is
        not known statically (e.g. after a float timm Conv2dSame, whose pad qonnx's
        cleanup cannot fold), qonnx's FoldConstants folds that Shape to zeros and bakes a
        wrong pad: the QONNX graph has a static input size, so the pad is a constant.
        """
        x = F.pad(x, _same_pad(x, weight, self.stride, self.dilation))
        return self._conv_forward(x, weight, bias)      # padding is 0 here

    conv1d_same_zeros_pad_stride = _same_zeros_pad_stride
    conv2d_same_zeros_pad_stride = _same_zeros_pad_stride
    conv3d_same_zeros_pad_stride = _same_zeros_pad_stride

    @staticmethod
    def _geometry_kwargs(module):
        return dict(
            in_channels=module.in_channels,
            out_channels=module.out_channels,
            kernel_size=module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            padding_mode=module.padding_mode)


def _make_conv(name: str, brevitas_cls, float_cls):

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size,
            stride=1,
            padding=0,
            dilation=1,
            groups: int = 1,
            padding_mode: str = "zeros",
            bias: Optional[bool] = True,
            weight_quant=LRBinaryWeightPerTensorConst,
            bias_quant=None,
            input_quant=None,
            output_quant=None,
            return_quant_tensor: bool = False,
            lr_p_min: float = DEFAULT_P_MIN,
            lr_p_max: float = DEFAULT_P_MAX,
            lr_eps: float = DEFAULT_EPS,
            lr_output_moments: bool = False,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            **kwargs) -> None:
        brevitas_cls.__init__(
            self, in_channels, out_channels, kernel_size, stride=stride, padding=padding,
            dilation=dilation, groups=groups, padding_mode=padding_mode, bias=bias,
            weight_quant=weight_quant, bias_quant=bias_quant, input_quant=input_quant,
            output_quant=output_quant, return_quant_tensor=return_quant_tensor,
            device=_no_meta(device), dtype=dtype, **kwargs)
        self._init_lr(lr_p_min, lr_p_max, lr_eps, lr_output_moments)
        self._finish_init(device)

    doc = f"{brevitas_cls.__name__[5:]} layer with LR-trained discrete weights (see module docstring)."
    return type(name, (_LRQuantConvNd, brevitas_cls), {
        "__init__": __init__,
        "__doc__": doc,
        "__module__": __name__,
        "_float_class": staticmethod(lambda: float_cls)})


LRQuantConv1d = _make_conv("LRQuantConv1d", QuantConv1d, nn.Conv1d)
LRQuantConv2d = _make_conv("LRQuantConv2d", QuantConv2d, nn.Conv2d)
LRQuantConv3d = _make_conv("LRQuantConv3d", QuantConv3d, nn.Conv3d)


def lr_layers(model: nn.Module):
    """(name, layer) for every LR layer in `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LRWeightMixin)]


def lr_regularization(model: nn.Module) -> Tensor:
    """Sum of the LR regularizers of every LR layer (0 if there are none)."""
    terms = [m.lr_regularizer() for _, m in lr_layers(model)]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()
