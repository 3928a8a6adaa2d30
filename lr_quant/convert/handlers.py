"""The module classes the converter knows.

A Conv/Linear (``nn.modules.conv._ConvNd``, ``nn.Linear``, timm's ``CondConv2d``) converts
only if its *exact* class has a :class:`LayerHandler` in :data:`LAYER_HANDLERS` whose LR
layer computes what the float layer computes; a handler without a target class records why
that class stays in full precision. :data:`DROPPABLE_ACTIVATIONS` are the monotone
activation modules a converter may drop in front of a sign.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from brevitas.nn import QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear
from torch import nn

from ..nn.lr_layers import LRQuantConv1d, LRQuantConv2d, LRQuantConv3d, LRQuantLinear
from ..registry import WeightQuantizer

__all__ = [
    "LayerHandler",
    "LAYER_HANDLERS",
    "register_layer_handler",
    "DROPPABLE_ACTIVATIONS",
    "conv_linear_modules",
    "replace_module",
]

#: activation modules that are monotone non-decreasing: sign(f(a) - t) = sign(a - t') with
#: a learned threshold, so a converter may drop them in front of a sign (ReLU: t' = t, t > 0)
DROPPABLE_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.ELU, nn.Sigmoid,
                         nn.Tanh)


@dataclass(frozen=True)
class LayerHandler:
    """How a float layer class converts: target classes and constructor overrides, or the
    reason it stays in full precision (``lr_class is None``)."""
    lr_class: Optional[type] = None
    brevitas_class: Optional[type] = None
    kwargs: Tuple[Tuple[str, Any], ...] = ()
    reason: str = ""

    def target(self, quantizer: WeightQuantizer) -> Optional[type]:
        return self.lr_class if quantizer.is_lr else self.brevitas_class


#: exact class -> handler (subclasses are *not* covered: their forward may differ)
LAYER_HANDLERS: Dict[type, LayerHandler] = {}


def register_layer_handler(cls: type, handler: LayerHandler) -> None:
    """Teach the converter a layer class (exact type match)."""
    LAYER_HANDLERS[cls] = handler


register_layer_handler(nn.Linear, LayerHandler(LRQuantLinear, QuantLinear))
register_layer_handler(nn.Conv1d, LayerHandler(LRQuantConv1d, QuantConv1d))
register_layer_handler(nn.Conv2d, LayerHandler(LRQuantConv2d, QuantConv2d))
register_layer_handler(nn.Conv3d, LayerHandler(LRQuantConv3d, QuantConv3d))
register_layer_handler(nn.modules.linear.NonDynamicallyQuantizableLinear, LayerHandler(
    reason="out_proj of nn.MultiheadAttention: its weight is read directly by "
           "F.multi_head_attention_forward, the module is never called"))

_CondConv2d = None
try:  # timm layer variants
    from timm.layers import Linear as _TimmLinear
    from timm.layers.cond_conv2d import CondConv2d as _CondConv2d
    from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
    from timm.layers.std_conv import (ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d,
                                      StdConv2dSame)

    # forward is F.linear(x, weight, bias) (a dtype cast under torchscript only)
    register_layer_handler(_TimmLinear, LayerHandler(LRQuantLinear, QuantLinear))
    # TF 'SAME' padding computed from the input size: Brevitas' QuantConv2d does the same
    # (torch padding='same' for stride 1, its own pad for stride > 1; same split of the pad;
    # LR layers compute that pad as constants, so the QONNX export has a static Pad)
    _same = (("padding", "same"),)
    register_layer_handler(Conv2dSame, LayerHandler(LRQuantConv2d, QuantConv2d, _same))
    register_layer_handler(Conv2dSameExport, LayerHandler(LRQuantConv2d, QuantConv2d, _same))
    _std = ("weight standardization: the forward re-normalizes the weight per output "
            "channel, discrete weights would not stay discrete")
    for _cls in (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame):
        register_layer_handler(_cls, LayerHandler(reason=_std))
    register_layer_handler(_CondConv2d, LayerHandler(
        reason="CondConv2d: per-sample mixture of expert kernels (routing weights), "
               "no LR layer for it"))
except ImportError:  # pragma: no cover - timm is a dependency
    pass


def _is_conv_linear(module: nn.Module) -> bool:
    types = (nn.modules.conv._ConvNd, nn.Linear) + ((_CondConv2d,) if _CondConv2d else ())
    return isinstance(module, types)


def conv_linear_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every Conv / Linear layer the converter accounts for."""
    return [(n, m) for n, m in model.named_modules() if _is_conv_linear(m)]


def _layer_kind(module: nn.Module) -> str:
    """The recipe's weight-quantizer key of a layer: "linear", "depthwise" or "conv"."""
    if isinstance(module, nn.Linear):
        return "linear"
    groups = getattr(module, "groups", 1)
    if groups > 1 and groups == getattr(module, "in_channels", -1):
        return "depthwise"
    return "conv"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Register `new` under every name of the module now at `name` (a module registered
    several times stays one module)."""
    old = model.get_submodule(name)
    for n, m in list(model.named_modules(remove_duplicate=False)):
        if m is old:
            parent, _, child = n.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
