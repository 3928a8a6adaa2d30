"""Brevitas weight quantizers (injectors) for LR layers.

An LR weight quantizer is a stock Brevitas weight quantizer for the *deterministic*
discrete network (binary -> BipolarQuant, any other value set -> a narrow-range signed
integer `Quant`), tagged with the distribution the LR layer learns:

    lr_distribution: str      registered name ("binary", "ternary", "categorical")
    lr_values: tuple          the value set, in units of the quantizer's scale

`LRQuantLinear` / `LRQuantConv2d` read the tags to build their logits; a stock
`brevitas.nn.QuantConv2d(..., weight_quant=LRTernaryWeightPerTensorConst)` simply
quantizes its float weight to {-1, 0, +1} * scale, which is what a frozen layer is.

Scale: `PerTensorConst` quantizers have scale 1 (for layers followed by a normalization);
`PerChannelFloat` ones learn a per-output-channel scale alpha (Brevitas ParameterScaling,
initialized by the LR layer from mean |W| per channel of the pretrained weight).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence, Tuple, Type

from brevitas.core.function_wrapper import TensorClamp
from brevitas.core.zero_point import ZeroZeroPoint
from brevitas.inject import ExtendedInjector
from brevitas.inject.enum import BitWidthImplType
from brevitas.inject.enum import FloatToIntImplType
from brevitas.inject.enum import QuantType
from brevitas.inject.enum import RestrictValueType
from brevitas.inject.enum import ScalingImplType
from brevitas.quant.solver import WeightQuantSolver

from ..distributions import (BinaryDistribution, TernaryDistribution, WeightDistribution,
                             get_distribution)

__all__ = [
    "LRWeightQuant",
    "LRBinaryWeightPerTensorConst",
    "LRBinaryWeightPerChannelFloat",
    "LRTernaryWeightPerTensorConst",
    "LRTernaryWeightPerChannelFloat",
    "LRIntegerWeightPerTensorConst",
    "LRIntegerWeightPerChannelFloat",
    "lr_weight_quant",
    "integer_grid",
    "distribution_from_quantizer",
    "is_lr_weight_quant",
    "threshold_factor",
]

MAX_BIT_WIDTH = 8


def integer_grid(values: Sequence[float]) -> Tuple[float, Tuple[int, ...], int]:
    """Express a value set as unit * integers: returns (unit, integers, bit_width).

    bit_width is 1 for {-u, +u} (bipolar) and otherwise the narrow-range signed integer
    width that holds every integer. Raises if the set is not on an integer grid that fits
    in MAX_BIT_WIDTH bits (Brevitas/QONNX can only represent such sets).
    """
    fractions = [Fraction(v).limit_denominator(1 << 16) for v in values]
    if any(abs(float(f) - v) > 1e-9 * max(1.0, abs(v)) for f, v in zip(fractions, values)):
        raise ValueError(f"value set {tuple(values)} is not on a rational integer grid")
    nonzero = [f for f in fractions if f != 0]
    unit = Fraction(0)
    for f in nonzero:
        unit = Fraction(math.gcd(unit.numerator * f.denominator, f.numerator * unit.denominator),
                        unit.denominator * f.denominator) if unit else abs(f)
    integers = tuple(int(f / unit) for f in fractions)
    if integers == (-1, 1):
        return float(unit), integers, 1
    largest = max(abs(i) for i in integers)
    bit_width = max(2, math.ceil(math.log2(largest + 1)) + 1)
    if bit_width > MAX_BIT_WIDTH:
        raise ValueError(
            f"value set {tuple(values)} needs {bit_width}-bit integers (unit {float(unit)}); "
            f"at most {MAX_BIT_WIDTH} bits are supported")
    return float(unit), integers, bit_width


class LRWeightQuant(WeightQuantSolver):
    """Base of LR weight quantizers: per-tensor constant scale 1, round-to-nearest."""
    scaling_impl_type = ScalingImplType.CONST
    scaling_const = 1.0
    scaling_init = 1.0
    restrict_scaling_type = RestrictValueType.FP
    scaling_per_output_channel = False
    float_to_int_impl_type = FloatToIntImplType.ROUND
    bit_width_impl_type = BitWidthImplType.CONST
    tensor_clamp_impl = TensorClamp  # never the in-place clamp: it would edit the weight
    narrow_range = True
    signed = True
    zero_point_impl = ZeroZeroPoint


class _PerChannelFloat(ExtendedInjector):
    scaling_impl_type = ScalingImplType.PARAMETER
    scaling_per_output_channel = True


class LRBinaryWeightPerTensorConst(LRWeightQuant):
    """Binary {-1, +1} weights, scale 1: exported as BipolarQuant."""
    quant_type = QuantType.BINARY
    bit_width = 1
    lr_distribution = BinaryDistribution()


class LRBinaryWeightPerChannelFloat(_PerChannelFloat, LRBinaryWeightPerTensorConst):
    """Binary weights with a learned per-output-channel scale alpha."""


class LRIntegerWeightPerTensorConst(LRWeightQuant):
    """Weights on a narrow-range signed integer grid (``bit_width`` bits, set with
    ``.let``), exported as a narrow `Quant`; `lr_weight_quant` builds the categorical ones."""
    quant_type = QuantType.INT


class LRIntegerWeightPerChannelFloat(_PerChannelFloat, LRIntegerWeightPerTensorConst):
    """Integer-grid weights with a learned per-output-channel scale alpha."""


class LRTernaryWeightPerTensorConst(LRIntegerWeightPerTensorConst):
    """Ternary {-1, 0, +1} weights (Shayer), scale 1: exported as a 2-bit narrow `Quant`."""
    bit_width = 2
    lr_distribution = TernaryDistribution()


class LRTernaryWeightPerChannelFloat(_PerChannelFloat, LRTernaryWeightPerTensorConst):
    """Ternary weights with a learned per-output-channel scale alpha."""


def lr_weight_quant(
        distribution="binary", per_channel_scale: bool = False) -> Type[LRWeightQuant]:
    """The LR weight quantizer for a distribution (a name, dict or WeightDistribution).

    Categorical value sets must lie on an integer grid (see `integer_grid`): the quantizer
    scale is the grid unit (times alpha when `per_channel_scale`).
    """
    dist = get_distribution(distribution)
    unit, _, bit_width = integer_grid(dist.values)
    if bit_width == 1:
        base = LRBinaryWeightPerChannelFloat if per_channel_scale else LRBinaryWeightPerTensorConst
    elif dist.name == "ternary":
        base = LRTernaryWeightPerChannelFloat if per_channel_scale else \
            LRTernaryWeightPerTensorConst
    else:
        base = LRIntegerWeightPerChannelFloat if per_channel_scale else \
            LRIntegerWeightPerTensorConst
    # Brevitas' integer quantizers hold the threshold: scale = threshold / max_int.
    threshold = unit * threshold_factor(bit_width)
    return base.let(
        bit_width=bit_width,
        scaling_const=threshold,
        scaling_init=threshold,
        lr_distribution=dist)


def threshold_factor(bit_width: int) -> int:
    """Ratio of a Brevitas scaling value to the quantization scale for a weight quantizer.

    Brevitas' narrow-range integer quantizers treat the scaling value as the threshold
    (largest representable magnitude): scale = threshold / (2^(b-1) - 1). Binary: 1.
    """
    return 1 if bit_width == 1 else 2 ** (bit_width - 1) - 1


def _injector(quant):
    return quant if isinstance(quant, type) else getattr(quant, "quant_injector", None)


def is_lr_weight_quant(quant) -> bool:
    """True for an LR quantizer injector (class) or a proxy built from one."""
    injector = _injector(quant)
    if injector is None:
        return False
    try:
        return isinstance(injector.lr_distribution, (WeightDistribution, str))
    except Exception:  # dependencies raises its own error types for missing attributes
        return False


def distribution_from_quantizer(quant) -> WeightDistribution:
    """The WeightDistribution an LR quantizer (injector or proxy) carries as
    ``lr_distribution`` (a name plus ``lr_values`` for categorical sets is accepted too)."""
    if not is_lr_weight_quant(quant):
        raise TypeError(
            f"{quant!r} is not an LR weight quantizer (it has no `lr_distribution` tag); "
            f"use one of lr_quant.quant.weight's quantizers or lr_weight_quant(...)")
    injector = _injector(quant)
    name = injector.lr_distribution
    if isinstance(name, WeightDistribution):
        return name
    values = tuple(injector.lr_values)
    if name == "categorical":
        return get_distribution(name, values=values)
    return get_distribution(name)
