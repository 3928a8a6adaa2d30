"""Brevitas activation quantizers for stochastic binary and ternary activations (LR-nets).

They plug into Brevitas' *stock* ``ActQuantProxyFromInjector`` (export handlers are looked
up by exact proxy class, so the proxy is never subclassed), as ``tensor_quant``:

- ``StochasticBinaryQuant`` (drop-in for Brevitas' ``BinaryQuant``): in ``train()`` a
  stochastic +-1 sample, in ``eval()`` ``x >= 0 -> +1``, scale 1. Brevitas' QONNX handler
  emits ``BipolarQuant(x, 1.0)``.
- ``StochasticTernaryQuant`` (drop-in for the 2-bit narrow ``IntQuant`` of Brevitas'
  ``SignedTernaryActPerTensorConst``): in ``train()`` a stochastic sample in {-1, 0, +1}
  with thresholds +-1/2, in ``eval()`` ``clip(round(x), -1, 1)`` (half to even), scale 1.
  Exported as ``Quant(x, 1.0, 0, 2, signed=1, narrow=1, ROUND)``.
- ``StochasticUnsignedTernaryQuant``: the same three values shifted to {0, 1, 2} (input
  ``u + 1`` from ``UnsignedTernaryThreshold``), exported as ``Quant(x, 1.0, 0, 2, signed=0,
  narrow=1)``: a quantizer whose minimum is 0, for a tensor FINN must pad with zeros (a
  padded max-pool pads with the input type's minimum; docs/finn.md).

The learned thresholds are the proxy's ``act_impl``, run before the quantizer in training
and in export (``lr_quant.quant.threshold``): ``ThresholdShift`` (x - t) for the sign,
``TernaryThreshold`` ((x - c) / (2t): thresholds c -+ t) for the ternary quantizer.

Training modes (``sign_mode``), for the quantizer's input x (after the threshold module):

- ``"moment"`` (x is a ``MomentTensor`` with moments (m, v)): the exact probabilities of a
  Gaussian, binary P(+1) = Phi(m / sqrt(v + eps)); ternary P(+1) = Phi((m - 1/2)/s),
  P(-1) = Phi(-(m + 1/2)/s), s = sqrt(v + eps).
- ``"noise"`` (plain x): x is read as x + N(0, sigma_a^2). For the ternary quantizer x is
  already divided by the dead-zone width 2t, so sigma_a is in units of 2t.
- ``"auto"`` (default): moment mode when the input carries moments, noise mode otherwise.

The hard sample is exact; its gradient is the straight-through relaxation with temperature
tau (binary concrete for +-1, Gumbel-softmax for ternary). With
``sign_propagate_moments=True`` the output is a ``MomentTensor`` (sample, mean, variance of
the discrete output) so a following LR layer can use the moments; Brevitas layers that do
not know moments just use the sample. An LR layer's own input quantizer is read for its
moments only (:func:`moments_only`): in training it draws no sample (its data is E[s]).

sigma_a and tau are buffers (sigma_a a parameter when ``sign_learn_noise_std=True``) with
setters; :mod:`.sign_settings` sets them on every quantizer of a model and
:class:`lr_quant.schedule.ParamSchedule` schedules them over training.

# References
- Roth et al. "Training Discrete-Valued Neural Networks with Sign Activations Using Weight
  Distributions". ECML-PKDD 2019.
- Liu et al. "ReActNet: Towards Precise Binary Neural Network with Generalized Activation
  Functions". ECCV 2020 (RSign: learnable per-channel threshold).
- Maddison et al. "The Concrete Distribution". ICLR 2017; Jang et al. "Categorical
  Reparameterization with Gumbel-Softmax". ICLR 2017.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from brevitas.core.bit_width import BitWidthConst
from brevitas.core.scaling import ConstScaling
from brevitas.core.utils import StatelessBuffer
from brevitas.function.ops_ste import binary_sign_ste, round_ste
from brevitas.inject import ExtendedInjector
from brevitas.quant.binary import SignedBinaryActPerTensorConst
from brevitas.quant.ternary import SignedTernaryActPerTensorConst

from lr_quant.compile_regions import compiled
from lr_quant.functional.sign import (
    DEFAULT_EPS,
    relaxed_sign_sample,
    relaxed_ternary_sample,
    sign_log_odds,
    sign_log_odds_and_moments,
    sign_moments,
    ternary_log_probabilities,
    ternary_moments_from_log_probabilities,
)
from lr_quant.moments import MomentTensor, split_moments

from .threshold import (THRESHOLD_INITS, TernaryThreshold, ThresholdShift, UnsignedTernaryThreshold,
                        _TolerateMissingKeys, attach_threshold)

__all__ = [
    "SIGN_MODES",
    "THRESHOLD_INITS",
    "StochasticActQuant",
    "moments_only",
    "StochasticBinaryQuant",
    "StochasticTernaryQuant",
    "StochasticUnsignedTernaryQuant",
    "unsigned_ternary_injector",
    "ThresholdShift",
    "TernaryThreshold",
    "UnsignedTernaryThreshold",
    "StochasticSignActPerTensorConst",
    "StochasticSignThresholdActPerChannelConst",
    "StochasticTernaryActPerTensorConst",
    "StochasticTernaryThresholdActPerChannelConst",
    "ParamSchedule",
    "attach_threshold",
    "sign_quant_modules",
    "set_sign_temperature",
    "set_sign_noise_std",
]

SIGN_MODES = ("auto", "noise", "moment")


def _positive_float(name: str, value) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


class StochasticActQuant(_TolerateMissingKeys, nn.Module):
    """Base of the stochastic activation quantizers: a sample in training, deterministic in
    eval; returns ``(y, scale, zero_point, bit_width)`` like Brevitas' tensor quantizers.

    Subclasses set ``BIT_WIDTH`` (and ``SCALE_INVARIANT = True`` when the output only depends
    on the sign of x, so x / scale is skipped) and implement ``_sample(mean, var, eps)`` (hard sample with
    a relaxed gradient, plus the output moments or None) and ``_deterministic(x)``.

    Args:
        scaling_impl: Brevitas scaling module (constant 1 for FINN-compatible export).
        sign_noise_std: sigma_a of the noise mode (> 0).
        sign_temperature: tau of the relaxation (> 0).
        sign_learn_noise_std: make sigma_a a trainable parameter.
        sign_mode: "auto", "noise" or "moment".
        sign_propagate_moments: return a MomentTensor (output mean and variance) in training.
        sign_eps: eps of sqrt(v + eps) in moment mode.
    """
    BIT_WIDTH = 1
    SCALE_INVARIANT = False
    #: run ``_sample`` as a torch.compile region (see lr_quant.compile_regions)
    lr_compile: bool = False
    #: set by :func:`moments_only` while the only reader takes the moments: no sample
    reads_moments_only: bool = False

    def __init__(
            self,
            scaling_impl: nn.Module,
            sign_noise_std: float = 1.0,
            sign_temperature: float = 1.0,
            sign_learn_noise_std: bool = False,
            sign_mode: str = "auto",
            sign_propagate_moments: bool = True,
            sign_eps: float = DEFAULT_EPS):
        super().__init__()
        if sign_mode not in SIGN_MODES:
            raise ValueError(f"sign_mode must be one of {SIGN_MODES}, got {sign_mode!r}")
        self.scaling_impl = scaling_impl
        self.bit_width = BitWidthConst(self.BIT_WIDTH)
        self.zero_point = StatelessBuffer(torch.tensor(0.0))
        sigma = torch.tensor(_positive_float("noise std sigma_a", sign_noise_std))
        if sign_learn_noise_std:
            self.noise_std = nn.Parameter(sigma)
        else:
            self.register_buffer("noise_std", sigma)
        self.register_buffer(
            "temperature", torch.tensor(_positive_float("temperature tau", sign_temperature)))
        self.mode = sign_mode
        self.propagate_moments = bool(sign_propagate_moments)
        self.eps = float(sign_eps)
        self.generator: Optional[torch.Generator] = None

    def set_temperature(self, tau: float) -> None:
        """Set tau (> 0) of the relaxation."""
        self.temperature.fill_(_positive_float("temperature tau", tau))

    def set_noise_std(self, sigma: float) -> None:
        """Set sigma_a (> 0) of the noise mode."""
        with torch.no_grad():
            self.noise_std.fill_(_positive_float("noise std sigma_a", sigma))

    def _training_sample(self, x: Tensor) -> Tensor:
        mean, var = split_moments(x)
        if self.mode == "moment" and var is None:
            raise ValueError("sign_mode='moment' needs a MomentTensor input (with moments)")
        if var is None or self.mode == "noise":
            mean = x.plain() if isinstance(x, MomentTensor) else x
            # a learned sigma_a is used as |sigma_a| (>= 1e-6): an optimizer step may cross 0
            sigma = self.noise_std.abs().clamp_min(1e-6)
            var, eps = sigma * sigma, 0.0   # a scalar: broadcast inside the node, no full pass
        else:
            eps = self.eps
        if self.reads_moments_only and self.propagate_moments:
            moments = self._moments
            if self.lr_compile:
                moments = functools.partial(
                    compiled(type(self)._moments, mean.device.type), self)
            out_mean, out_var = moments(mean, var, eps)
            return MomentTensor.from_moments(out_mean, out_var, sample=out_mean, validate=False)
        sample = self._sample
        if self.lr_compile and self.generator is None:
            sample = functools.partial(compiled(type(self)._sample, mean.device.type), self)
        y, moments = sample(mean, var, eps)
        if moments is not None:
            y = MomentTensor.from_moments(moments[0], moments[1], sample=y, validate=False)
        return y

    def _sample(self, mean: Tensor, var: Tensor, eps: float):
        raise NotImplementedError

    def _moments(self, mean: Tensor, var: Tensor, eps: float):
        """(E[y], Var[y]) of the output, nothing else (no sample, no log-odds)."""
        raise NotImplementedError

    def _deterministic(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _is_unit_scale(self, scale: Tensor) -> bool:
        """True for Brevitas' constant scale 1 (the FINN form): y * 1 = y, and the
        multiply would cost three passes over a MomentTensor (sample, mean, variance) and a
        second saved copy of E[y]. Read once (a constant module: no device sync after)."""
        unit = self.__dict__.get("_unit_scale")
        if unit is None:
            unit = (isinstance(self.scaling_impl, ConstScaling) and not scale.requires_grad
                    and bool((scale == 1).all()))
            self._unit_scale = unit
        return unit

    def forward(self, x: Tensor):
        scale = self.scaling_impl(x)
        unit = self.training and self._is_unit_scale(scale)
        if not (self.SCALE_INVARIANT or unit):
            x = x / scale
        if self.training:
            y = self._training_sample(x)
            if not unit:
                y = y * scale
        else:
            if isinstance(x, MomentTensor):
                x = x.plain()
            y = self._deterministic(x) * scale
        return y, scale, self.zero_point(), self.bit_width()

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, noise_std={float(self.noise_std):.4g}, "
                f"temperature={float(self.temperature):.4g}, "
                f"propagate_moments={self.propagate_moments}")


class StochasticBinaryQuant(StochasticActQuant):
    """Binary quantizer: stochastic +-1 in training, ``x >= 0 -> +1`` in eval.

    Training: P(+1) = Phi(m / sqrt(v)) (moments or noise mode), hard sample with the
    straight-through binary-concrete gradient; output moments mean 2P - 1, var 4P(1-P)
    (Roth et al. 2019). Drop-in for Brevitas' ``BinaryQuant``.
    """
    BIT_WIDTH = 1
    SCALE_INVARIANT = True   # sign(x / scale) = sign(x) for scale > 0

    def _sample(self, mean, var, eps):
        if self.propagate_moments:
            log_odds, *moments = sign_log_odds_and_moments(mean, var, 0.0, eps)
        else:
            log_odds, moments = sign_log_odds(mean, var, 0.0, eps), None
        # tau and the moments are valid by construction: skip the (device-syncing) checks
        return relaxed_sign_sample(log_odds, self.temperature, self.generator,
                                   validate=False), moments

    def _moments(self, mean, var, eps):
        return sign_moments(mean, var, 0.0, eps)

    def _deterministic(self, x):
        return binary_sign_ste(x)


class StochasticTernaryQuant(StochasticActQuant):
    """Ternary quantizer on {-1, 0, +1} with thresholds +-1/2: stochastic in training,
    ``clip(round(x), -1, 1)`` (half to even: |x| <= 1/2 -> 0) in eval.

    Training: P(+1) = Phi((m - 1/2)/s), P(-1) = Phi(-(m + 1/2)/s), s = sqrt(v (+ eps)),
    hard Gumbel-max sample with the straight-through Gumbel-softmax gradient; output moments
    E = P(+1) - P(-1), Var = sum_k P_k (s_k - E)^2 (Roth et al. 2019). Put a
    ``TernaryThreshold`` in front (thresholds c -+ t in the input's units). Drop-in for the
    2-bit narrow signed ``IntQuant`` of Brevitas' ternary activation quantizer (whose scale
    is the threshold / (2^(2-1) - 1) = the threshold).
    """
    BIT_WIDTH = 2

    def _sample(self, mean, var, eps):
        log_probs = ternary_log_probabilities(mean, var, 0.5, eps, validate=False)
        moments = (ternary_moments_from_log_probabilities(log_probs)
                   if self.propagate_moments else None)
        return relaxed_ternary_sample(log_probs, self.temperature, self.generator,
                                      validate=False), moments

    def _moments(self, mean, var, eps):
        return ternary_moments_from_log_probabilities(
            ternary_log_probabilities(mean, var, 0.5, eps, validate=False))

    def _deterministic(self, x):
        return torch.clamp(round_ste(x), -1.0, 1.0)


class StochasticUnsignedTernaryQuant(StochasticTernaryQuant):
    """:class:`StochasticTernaryQuant` on x - 1, shifted back: values {0, 1, 2}, x in the
    units of ``UnsignedTernaryThreshold`` (u + 1). Same probabilities, output mean + 1, same
    variance; eval ``clip(round(x), 0, 2)`` (half to even)."""

    def _sample(self, mean, var, eps):
        y, moments = super()._sample(mean - 1.0, var, eps)
        if moments is not None:
            moments = (moments[0] + 1.0, moments[1])
        return y + 1.0, moments

    def _moments(self, mean, var, eps):
        out_mean, out_var = super()._moments(mean - 1.0, var, eps)
        return out_mean + 1.0, out_var

    def _deterministic(self, x):
        return torch.clamp(round_ste(x), 0.0, 2.0)


def _stochastic_tensor_quant(proxy) -> Optional[StochasticActQuant]:
    fused = getattr(proxy, "fused_activation_quant_proxy", None)
    quant = getattr(fused, "tensor_quant", None)
    return quant if isinstance(quant, StochasticActQuant) else None


@contextlib.contextmanager
def moments_only(proxy) -> Iterator[bool]:
    """Within the block, the stochastic quantizer of the Brevitas act proxy `proxy` (if it
    has one that propagates moments) returns its output moments (E[y], Var[y]) in training
    with E[y] as the data, and draws no sample: for a reader that uses the moments only, as
    an LR layer does with its input (x E[w], x^2 Var[w] + Var[x] E[w^2]). The sample, the
    log-odds and the relaxation were dead work there (no gradient ever reached them).
    Yields whether it applies."""
    quant = _stochastic_tensor_quant(proxy)
    if quant is None or not quant.propagate_moments or quant.reads_moments_only:
        yield False
        return
    quant.reads_moments_only = True
    try:
        yield True
    finally:
        quant.reads_moments_only = False


def unsigned_ternary_injector(injector):
    """`injector` (a ternary activation quantizer: the stochastic one or Brevitas' 2-bit
    narrow ``IntQuant``) with its output shifted to {0, 1, 2}, scale 1, unsigned; its other
    options (noise, temperature, mode ...) kept. Pair it with ``UnsignedTernaryThreshold``."""
    if issubclass(injector, StochasticTernaryActPerTensorConst):
        return injector.let(tensor_quant=StochasticUnsignedTernaryQuant, signed=False,
                            min_val=0.0, max_val=2.0, scaling_init=1.0)
    if issubclass(injector, SignedTernaryActPerTensorConst):
        return injector.let(signed=False, min_val=0.0, max_val=2.0)   # scale 2 / max_int 2
    raise TypeError(f"{injector.__name__} is not a 2-bit narrow ternary activation quantizer")


class _StochasticOptions(ExtendedInjector):
    """Injector defaults of the stochastic quantizers' options (override with ``.let``)."""
    sign_noise_std = 1.0
    sign_temperature = 1.0
    sign_learn_noise_std = False
    sign_mode = "auto"
    sign_propagate_moments = True
    sign_eps = DEFAULT_EPS


class _ThresholdOptions(ExtendedInjector):
    """Injector defaults of the learned threshold (``act_impl``); needs a layer that keeps
    the injector's ``act_impl`` (``lr_quant.nn.StochasticSign`` / ``StochasticTernarySign``
    or Brevitas' ``QuantNonLinearActLayer`` family). As a layer's ``input_quant`` Brevitas
    drops ``act_impl``: use :func:`attach_threshold` there."""
    passthrough_act = True
    threshold_channels = None
    threshold_channel_dim = 1
    threshold_init = "median"
    threshold_learnable = True


class StochasticSignActPerTensorConst(_StochasticOptions, SignedBinaryActPerTensorConst):
    """Stochastic sign activation quantizer, per-tensor constant scale 1, no threshold.

    Use it as ``act_quant=`` of ``QuantIdentity`` or ``input_quant=`` of any Brevitas layer;
    exports as ``BipolarQuant`` with scale 1. Options are injector attributes (override with
    ``.let(...)`` or layer kwargs): ``sign_noise_std``, ``sign_temperature``,
    ``sign_learn_noise_std``, ``sign_mode``, ``sign_propagate_moments``, ``sign_eps``.
    """
    tensor_quant = StochasticBinaryQuant
    min_val = -1.0
    max_val = 1.0


class StochasticSignThresholdActPerChannelConst(_ThresholdOptions, StochasticSignActPerTensorConst):
    """Stochastic sign with a learnable per-channel threshold (``act_impl = ThresholdShift``);
    set ``threshold_channels``. Exports ``Sub -> BipolarQuant(scale 1)``."""
    act_impl = ThresholdShift


class StochasticTernaryActPerTensorConst(_StochasticOptions, SignedTernaryActPerTensorConst):
    """Stochastic ternary activation quantizer {-1, 0, +1}, thresholds +-1/2, scale 1.

    Use it as ``act_quant=`` of ``QuantIdentity`` or ``input_quant=`` of any Brevitas layer;
    exports as ``Quant(scale 1, 2 bit, narrow, signed)``. Same options as
    :class:`StochasticSignActPerTensorConst`.
    """
    tensor_quant = StochasticTernaryQuant


class StochasticTernaryThresholdActPerChannelConst(_ThresholdOptions,
                                                   StochasticTernaryActPerTensorConst):
    """Stochastic ternary activation with learned per-channel thresholds c -+ t
    (``act_impl = TernaryThreshold``); exports ``Sub -> Mul -> Quant``."""
    act_impl = TernaryThreshold


# model walkers and the schedule live in their own modules (re-exported here)
from lr_quant.schedule import ParamSchedule  # noqa: E402

from .sign_settings import set_sign_noise_std, set_sign_temperature, sign_quant_modules  # noqa: E402
