"""LR layers: Brevitas QuantLinear / QuantConv subclasses whose weights are distributions.

Parameters of an LR layer:
    weight_logits   logits of the per-weight discrete distribution (trained)
    weight          the *materialized discrete network*: mode(logits) * s, kept in sync
                    (not trained; what Brevitas quantizes, exports and what a stock
                    Brevitas layer with the same quantizer would load)
    weight_quant.…  the quantizer's learned per-channel scale, if any
s = quantizer scale / grid unit is the per-channel scale alpha (1 for const quantizers).

Forward (Shayer et al. 2018, local reparameterization):
    train(), not frozen:  z = m + sqrt(v + eps) * e,   m = op(x; E[w] s) + b,
                          v = op(x^2; Var[w] s^2)      (see lr_quant.functional)
                          a MomentTensor input (m_x, v_x) adds op(v_x; E[w]^2 s^2 + Var[w] s^2)
                          to v; with lr_output_moments=True the output is a MomentTensor
                          carrying (m, v) with data z (see lr_quant.moments)
    eval() or frozen:     the parent Brevitas layer with the deterministic weight, so
                          Brevitas' QONNX export emits BipolarQuant / Quant for it.

Only `inner_forward_impl` is overridden (Brevitas runs input_quant -> quant_weight ->
bias_quant -> inner_forward_impl -> output_quant): padding modes, same-padding, groups
and dilation all come from the parent's operator, called twice. (Strided padding='same'
pads by constants computed from the input size, so that it exports as a static Pad.)

A float state dict (no `weight_logits` key) loads as a pretrained initialization: the
logits, the scale and the materialized weight are derived from the float weight. That
makes `LRQuantConv2d.from_float(conv)` and Brevitas' `layerwise_quantize` (strict, or
`assign=True` on the meta device) work unchanged.

`device="meta"` gives a layer whose tensors are all on meta; `to_empty(device=...)` then
`reset_parameters()` initializes it as a normal construction does (same seed, same state),
and so does a state-dict load with `assign=True`.
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
