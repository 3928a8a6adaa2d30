"""Quantizers by name: the registry a recipe refers to (larq-style ``register_alias``).

A recipe never names a Python class: it says ``conv: lr_binary_per_channel`` or
``quantizer: stochastic_sign``, optionally with options
(``{name: lr_categorical, values: [-2, -1, 0, 1, 2]}``). This module maps those names to
Brevitas injectors and tags each with a ``precision`` (bits; the summary and the
conversion report read it).

Weight quantizers (``family`` says which layer class they go into):

    lr_binary, lr_binary_per_channel        LR layer, {-1, +1} (* alpha per channel)
    lr_ternary, lr_ternary_per_channel      LR layer, {-1, 0, +1} (* alpha per channel)
    lr_categorical(values, per_channel_scale=False)
                                            LR layer, any value set on an integer grid
    brevitas_binary, brevitas_ternary       stock Brevitas STE baselines (QuantConv2d /
                                            QuantLinear with Brevitas' binary / ternary
                                            weight quantizer, minus its in-place clamp)

Activation quantizers (used as ``input_quant`` of converted layers):

    stochastic_sign(noise_std, temperature, mode, learn_noise_std, propagate_moments)
                    LR-nets' stochastic sign with a learned per-channel threshold
    stochastic_ternary(same options)
                    stochastic ternary {-1, 0, +1} with learned per-channel thresholds c -+ t
                    (noise_std in units of the dead-zone width 2t)
    ste_sign        deterministic sign with the same learned threshold, straight-through
                    gradient (Brevitas SignedBinaryActPerTensorConst + ThresholdShift):
                    the baseline LR has to beat
    ste_ternary     deterministic ternary with the same learned thresholds, straight-through
                    rounding (Brevitas SignedTernaryActPerTensorConst + TernaryThreshold)
    int8            Brevitas Int8ActPerTensorFloat (8-bit input quantizer, FINN style)

Add a quantizer with ``@register_weight_quantizer("name")`` /
``@register_act_quantizer("name")`` on a factory returning a ``WeightQuantizer`` /
``ActQuantizer``; the factory's keyword arguments are the recipe options.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from brevitas.core.function_wrapper import TensorClampSte
from brevitas.quant import Int8ActPerTensorFloat
from brevitas.quant.binary import SignedBinaryActPerTensorConst, SignedBinaryWeightPerTensorConst
from brevitas.quant.ternary import SignedTernaryActPerTensorConst, SignedTernaryWeightPerTensorConst

from .quant.activation import (SIGN_MODES, StochasticSignActPerTensorConst,
                               StochasticTernaryActPerTensorConst)
from .quant.threshold import TernaryThreshold, ThresholdShift
from .distributions import get_distribution
from .quant.weight import lr_weight_quant

__all__ = [
    "WeightQuantizer",
    "ActQuantizer",
    "register_weight_quantizer",
    "register_act_quantizer",
    "get_weight_quantizer",
    "get_act_quantizer",
    "available_weight_quantizers",
    "available_act_quantizers",
    "check_quantizer_spec",
]

LR = "lr"              # goes into lr_quant.nn LR layers
BREVITAS = "brevitas"  # goes into stock brevitas.nn layers


@dataclass(frozen=True)
class WeightQuantizer:
    """A resolved weight quantizer: the Brevitas injector and what it means."""
    name: str
    injector: Any
    precision: int            # bits per weight (1 binary, 2 ternary, ...)
    family: str               # LR or BREVITAS

    @property
    def is_lr(self) -> bool:
        return self.family == LR


@dataclass(frozen=True)
class ActQuantizer:
    """A resolved activation quantizer (a layer's ``input_quant``)."""
    name: str
    injector: Any
    precision: int
    is_sign: bool             # a threshold activation (+-1, ternary): may drop a ReLU
    threshold: Optional[type] = ThresholdShift   # the learned threshold module to attach


_WEIGHT: Dict[str, Callable[..., WeightQuantizer]] = {}
_ACT: Dict[str, Callable[..., ActQuantizer]] = {}


def _register(table, kind):
    def register(name: str, *aliases: str):
        def deco(factory):
            for n in (name,) + aliases:
                if n in table:
                    raise ValueError(f"{kind} quantizer {n!r} is already registered")
                table[n] = factory
            return factory
        return deco
    return register


register_weight_quantizer = _register(_WEIGHT, "weight")
register_act_quantizer = _register(_ACT, "activation")


def available_weight_quantizers() -> Tuple[str, ...]:
    return tuple(sorted(_WEIGHT))


def available_act_quantizers() -> Tuple[str, ...]:
    return tuple(sorted(_ACT))


def _split_spec(spec) -> Tuple[str, Dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"a quantizer given as a mapping needs a string 'name', got {spec!r}")
        return name, options
    raise TypeError(f"a quantizer is a name or a mapping {{name: ..., options}}, got {spec!r}")


def _resolve(table, kind, spec):
    name, options = _split_spec(spec)
    if name not in table:
        raise ValueError(
            f"unknown {kind} quantizer {name!r}; valid choices: {sorted(table)}")
    factory = table[name]
    params = inspect.signature(factory).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(
            f"{kind} quantizer {name!r} has no option(s) {unknown}; valid options: "
            f"{sorted(params) or 'none'}")
    try:
        return factory(**options)
    except TypeError as e:
        raise ValueError(f"bad options for {kind} quantizer {name!r}: {e}") from e


def get_weight_quantizer(spec: Union[None, str, Mapping, WeightQuantizer]) -> Optional[WeightQuantizer]:
    """None (full precision), a name, a mapping {name, **options} or a WeightQuantizer."""
    if spec is None or isinstance(spec, WeightQuantizer):
        return spec
    return _resolve(_WEIGHT, "weight", spec)


def get_act_quantizer(spec: Union[None, str, Mapping, ActQuantizer]) -> Optional[ActQuantizer]:
    """None (float input), a name, a mapping {name, **options} or an ActQuantizer."""
    if spec is None or isinstance(spec, ActQuantizer):
        return spec
    return _resolve(_ACT, "activation", spec)


def check_quantizer_spec(kind: str, spec) -> None:
    """Raise ValueError/TypeError if `spec` does not resolve (kind: "weight"/"activation")."""
    (get_weight_quantizer if kind == "weight" else get_act_quantizer)(spec)


# -- weight quantizers ------------------------------------------------------------------


def _lr(name, distribution, per_channel_scale):
    """An LR quantizer; its precision is the distribution's (bits to store one discrete
    weight: WeightDistribution.precision), the one place that number comes from."""
    return WeightQuantizer(name, lr_weight_quant(distribution, per_channel_scale),
                           get_distribution(distribution).precision, LR)


@register_weight_quantizer("lr_binary")
def _lr_binary():
    """LR binary {-1, +1}, scale 1 (for layers followed by a normalization)."""
    return _lr("lr_binary", "binary", False)


@register_weight_quantizer("lr_binary_per_channel")
def _lr_binary_per_channel():
    """LR binary with a learned per-output-channel scale alpha."""
    return _lr("lr_binary_per_channel", "binary", True)


@register_weight_quantizer("lr_ternary")
def _lr_ternary():
    """LR ternary {-1, 0, +1}, scale 1."""
    return _lr("lr_ternary", "ternary", False)


@register_weight_quantizer("lr_ternary_per_channel")
def _lr_ternary_per_channel():
    """LR ternary with a learned per-output-channel scale alpha."""
    return _lr("lr_ternary_per_channel", "ternary", True)


@register_weight_quantizer("lr_categorical")
def _lr_categorical(values, per_channel_scale: bool = False):
    """LR categorical (softmax) over `values` (an integer grid, e.g. [-2, -1, 0, 1, 2])."""
    if not isinstance(values, (list, tuple)) or len(values) < 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise TypeError(f"values must be a list of at least 2 numbers, got {values!r}")
    if not isinstance(per_channel_scale, bool):
        raise TypeError(f"per_channel_scale must be a bool, got {per_channel_scale!r}")
    dist = {"name": "categorical", "values": tuple(float(v) for v in values)}
    return _lr("lr_categorical", dist, per_channel_scale)


@register_weight_quantizer("brevitas_binary")
def _brevitas_binary():
    """Stock Brevitas binary weights (STE), without Brevitas' in-place clamp of the float
    weight (which would flatten a pretrained initialization to +-scale)."""
    return WeightQuantizer(
        "brevitas_binary", SignedBinaryWeightPerTensorConst.let(tensor_clamp_impl=TensorClampSte),
        1, BREVITAS)


@register_weight_quantizer("brevitas_ternary")
def _brevitas_ternary():
    """Stock Brevitas ternary weights (STE, threshold 0.5 * scale), no in-place clamp."""
    return WeightQuantizer(
        "brevitas_ternary",
        SignedTernaryWeightPerTensorConst.let(tensor_clamp_impl=TensorClampSte), 2, BREVITAS)


# -- activation quantizers --------------------------------------------------------------


def _stochastic(name: str, base, precision: int, threshold: type, noise_std, temperature,
                mode, learn_noise_std, propagate_moments) -> ActQuantizer:
    if mode not in SIGN_MODES:
        raise ValueError(f"mode must be one of {SIGN_MODES}, got {mode!r}")
    for key, value in (("noise_std", noise_std), ("temperature", temperature)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{key} must be a number > 0, got {value!r}")
    injector = base.let(
        sign_noise_std=float(noise_std), sign_temperature=float(temperature), sign_mode=mode,
        sign_learn_noise_std=bool(learn_noise_std),
        sign_propagate_moments=bool(propagate_moments))
    return ActQuantizer(name, injector, precision, is_sign=True, threshold=threshold)


@register_act_quantizer("stochastic_sign")
def _stochastic_sign(noise_std: float = 1.0, temperature: float = 1.0, mode: str = "auto",
                     learn_noise_std: bool = False, propagate_moments: bool = True):
    """LR-nets' stochastic sign (lr_quant.quant.activation), learned per-channel threshold."""
    return _stochastic("stochastic_sign", StochasticSignActPerTensorConst, 1, ThresholdShift,
                       noise_std, temperature, mode, learn_noise_std, propagate_moments)


@register_act_quantizer("stochastic_ternary")
def _stochastic_ternary(noise_std: float = 1.0, temperature: float = 1.0, mode: str = "auto",
                        learn_noise_std: bool = False, propagate_moments: bool = True):
    """Stochastic ternary activation, learned per-channel thresholds c -+ t."""
    return _stochastic("stochastic_ternary", StochasticTernaryActPerTensorConst, 2,
                       TernaryThreshold, noise_std, temperature, mode, learn_noise_std,
                       propagate_moments)


@register_act_quantizer("ste_sign")
def _ste_sign():
    """Deterministic sign(x - t), straight-through gradient, same learned threshold t."""
    return ActQuantizer("ste_sign", SignedBinaryActPerTensorConst, 1, is_sign=True)


@register_act_quantizer("ste_ternary")
def _ste_ternary():
    """Deterministic ternary with learned thresholds c -+ t, straight-through rounding."""
    return ActQuantizer("ste_ternary", SignedTernaryActPerTensorConst, 2, is_sign=True,
                        threshold=TernaryThreshold)


@register_act_quantizer("int8")
def _int8():
    """Brevitas Int8ActPerTensorFloat: 8-bit signed input quantizer with a learned scale."""
    return ActQuantizer("int8", Int8ActPerTensorFloat, 8, is_sign=False, threshold=None)
