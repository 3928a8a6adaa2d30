"""Brevitas activation quantizers for the stochastic sign (binary activations of LR-nets).

Two pieces plug into Brevitas' *stock* ``ActQuantProxyFromInjector`` (export handlers are
looked up by exact proxy class, so the proxy is never subclassed):

- ``tensor_quant = StochasticBinaryQuant``: returns ``(y, scale, zero_point, bit_width)``
  like Brevitas' ``BinaryQuant``. In ``train()`` y is a stochastic +-1 sample
  (``lr_quant.functional.sign``), in ``eval()`` it is ``binary_sign_ste(x) * scale``
  (x >= 0 -> +1), with scale 1. Brevitas' QONNX handler reads scale 1 and bit width 1 and
  emits ``BipolarQuant(x, 1.0)``.
- ``act_impl = ThresholdShift``: the learnable per-channel threshold t (ReActNet RSign
  shift) applied as ``x - t`` *before* the quantizer. The stock proxy runs ``act_impl``
  both in training and in export, so the export graph is ``Sub(x, t) -> BipolarQuant``.
  t is initialized from data (per-channel median of the first training batch).

Training modes of ``StochasticBinaryQuant`` (``sign_mode``):

- ``"moment"`` (input is a ``MomentTensor`` with moments (m, v)):
  P(+1) = Phi((m - t) / sqrt(v + eps)).
- ``"noise"`` (plain input x): x is read as x + N(0, sigma_a^2): P(+1) = Phi((x - t) / sigma_a).
- ``"auto"`` (default): moment mode when the input carries moments, noise mode otherwise.

The hard +-1 sample is exact; its gradient is the straight-through binary-concrete
relaxation with temperature tau. With ``sign_propagate_moments=True`` the output is a
``MomentTensor`` (sample +-1, mean 2P-1, var 4P(1-P)) so a following LR layer can use the
moments; Brevitas layers that do not know moments just use the +-1 sample.

sigma_a and tau are buffers (sigma_a a parameter when ``sign_learn_noise_std=True``) with
setters; ``ParamSchedule`` gives linear / cosine / exponential schedules for a recipe.

# References
- Roth et al. "Training Discrete-Valued Neural Networks with Sign Activations Using Weight
  Distributions". ECML-PKDD 2019.
- Liu et al. "ReActNet: Towards Precise Binary Neural Network with Generalized Activation
  Functions". ECCV 2020 (RSign: learnable per-channel threshold).
- Maddison et al. "The Concrete Distribution". ICLR 2017.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from brevitas import config as brevitas_config
from brevitas.core.bit_width import BitWidthConst
from brevitas.core.utils import StatelessBuffer
from brevitas.function.ops_ste import binary_sign_ste
from brevitas.quant.binary import SignedBinaryActPerTensorConst

from lr_quant.functional.sign import (
    DEFAULT_EPS,
    relaxed_sign_sample,
    sign_log_odds,
    sign_moments,
)
from lr_quant.moments import MomentTensor, split_moments

__all__ = [
    "SIGN_MODES",
    "THRESHOLD_INITS",
    "StochasticBinaryQuant",
    "ThresholdShift",
    "StochasticSignActPerTensorConst",
    "StochasticSignThresholdActPerChannelConst",
    "ParamSchedule",
    "attach_threshold",
    "sign_quant_modules",
    "set_sign_temperature",
    "set_sign_noise_std",
]

SIGN_MODES = ("auto", "noise", "moment")
THRESHOLD_INITS = ("median", "mean", "zero")


def _positive_float(name: str, value) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


class _TolerateMissingKeys:
    """Like Brevitas' core modules: under `brevitas.config.IGNORE_MISSING_KEYS` (set by
    `layerwise_quantize` while it loads float state dicts into new layers) this module's
    own parameters/buffers keep their initial values instead of failing a strict load."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if brevitas_config.IGNORE_MISSING_KEYS:
            for name in list(self._parameters) + list(self._buffers):
                if prefix + name in missing_keys:
                    missing_keys.remove(prefix + name)


class StochasticBinaryQuant(_TolerateMissingKeys, nn.Module):
    """Binary tensor quantizer: stochastic +-1 in training, ``x >= 0 -> +1`` in eval.

    Drop-in for Brevitas' ``BinaryQuant`` (same ``(y, scale, zero_point, bit_width)``
    output); see the module docstring for the training modes.

    Args:
        scaling_impl: Brevitas scaling module (constant 1 for FINN-compatible export).
        sign_noise_std: sigma_a of the noise mode (> 0).
        sign_temperature: tau of the binary-concrete relaxation (> 0).
        sign_learn_noise_std: make sigma_a a trainable parameter.
        sign_mode: "auto", "noise" or "moment".
        sign_propagate_moments: return a MomentTensor (mean 2P-1, var 4P(1-P)) in training.
        sign_eps: eps of sqrt(v + eps) in moment mode.
    """

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
        self.bit_width = BitWidthConst(1)
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
        if var is not None and self.mode != "noise":
            log_odds = sign_log_odds(mean, var, 0.0, self.eps)
            moments = sign_moments(mean, var, 0.0, self.eps) if self.propagate_moments else None
        else:
            if isinstance(x, MomentTensor):
                x = x.plain()
            # a learned sigma_a is used as |sigma_a| (>= 1e-6): an optimizer step may cross 0
            sigma = self.noise_std.abs().clamp_min(1e-6)
            var_n = (sigma * sigma).expand_as(x)
            log_odds = sign_log_odds(x, var_n, 0.0, 0.0)
            moments = sign_moments(x, var_n, 0.0, 0.0) if self.propagate_moments else None
        # tau and the moments are valid by construction: skip the (device-syncing) checks
        y = relaxed_sign_sample(log_odds, self.temperature, self.generator, validate=False)
        if moments is not None:
            y = MomentTensor.from_moments(moments[0], moments[1], sample=y, validate=False)
        return y

    def forward(self, x: Tensor):
        scale = self.scaling_impl(x)
        if self.training:
            y = self._training_sample(x) * scale
        else:
            if isinstance(x, MomentTensor):
                x = x.plain()
            y = binary_sign_ste(x) * scale
        return y, scale, self.zero_point(), self.bit_width()

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, noise_std={float(self.noise_std):.4g}, "
                f"temperature={float(self.temperature):.4g}, "
                f"propagate_moments={self.propagate_moments}")


class ThresholdShift(_TolerateMissingKeys, nn.Module):
    """x - t with a learnable threshold t per channel (or per tensor), initialized from data.

    ``sign(x - t)`` is the thresholded sign (ReActNet's RSign); for a Gaussian input
    N(m, v) it gives P(+1) = Phi((m - t)/sqrt(v)), and ``x - t`` keeps a MomentTensor's
    moments. A sign after a ReLU needs t > 0 (sign(ReLU(a) - t) = sign(a - t) then).

    Initialization (``threshold_init``): "median" (default; per channel, P(+1) = 1/2 on the
    first batch), "mean" or "zero", done on the first forward in training mode or by
    :meth:`init_from_data`; a loaded state dict keeps its (initialized) threshold.

    Args:
        threshold_channels: number of channels, or None for one per-tensor threshold.
        threshold_channel_dim: channel axis of the input (1 for NC / NCHW).
        threshold_init: "median", "mean" or "zero".
        threshold_learnable: train t (default) or keep it fixed after init.
    """

    def __init__(
            self,
            threshold_channels: Optional[int] = None,
            threshold_channel_dim: int = 1,
            threshold_init: str = "median",
            threshold_learnable: bool = True):
        super().__init__()
        if threshold_init not in THRESHOLD_INITS:
            raise ValueError(
                f"threshold_init must be one of {THRESHOLD_INITS}, got {threshold_init!r}")
        if threshold_channels is not None and int(threshold_channels) < 1:
            raise ValueError(f"threshold_channels must be >= 1, got {threshold_channels}")
        self.channels = None if threshold_channels is None else int(threshold_channels)
        self.channel_dim = int(threshold_channel_dim)
        self.init_method = threshold_init
        t = torch.zeros(self.channels or 1)
        if threshold_learnable:
            self.threshold = nn.Parameter(t)
        else:
            self.register_buffer("threshold", t)
        self.register_buffer("initialized", torch.tensor(threshold_init == "zero"))
        self._known_initialized = False   # host-side cache of `initialized` (no device sync)

    def _is_initialized(self) -> bool:
        if not self._known_initialized:
            self._known_initialized = bool(self.initialized)
        return self._known_initialized

    def _load_from_state_dict(self, *args, **kwargs):
        self._known_initialized = False
        super()._load_from_state_dict(*args, **kwargs)

    def _check_shape(self, x: Tensor) -> None:
        if self.channels is None:
            return
        if x.dim() <= self.channel_dim or x.shape[self.channel_dim] != self.channels:
            raise ValueError(
                f"threshold has {self.channels} channels on dim {self.channel_dim}, "
                f"input has shape {tuple(x.shape)}")

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Set t from a batch: per-channel median (or mean) of x."""
        x, _ = split_moments(x)   # the mean of a MomentTensor, the tensor itself otherwise
        if isinstance(x, MomentTensor):
            x = x.plain()
        x = x.detach()
        if not torch.isfinite(x).all():
            raise ValueError("threshold initialization got non-finite inputs (nan or inf)")
        self._check_shape(x)
        if self.init_method == "zero":
            value = torch.zeros_like(self.threshold)
        else:
            if self.channels is None:
                flat = x.reshape(1, -1)
            else:
                flat = x.movedim(self.channel_dim, 0).reshape(self.channels, -1)
            value = flat.median(dim=1).values if self.init_method == "median" else flat.mean(dim=1)
        self.threshold.copy_(value.to(self.threshold))
        self.initialized.fill_(True)
        self._known_initialized = True

    def reset(self) -> None:
        """Re-initialize from the next training batch."""
        self.initialized.fill_(self.init_method == "zero")
        self._known_initialized = False

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 0:   # Brevitas' zero-hw sentinel when it reads the scale
            return x - self.threshold.mean()
        if self.training and not self._is_initialized():
            self.init_from_data(x)
        self._check_shape(x)
        t = self.threshold
        if self.channels is not None:
            shape = [1] * x.dim()
            shape[self.channel_dim] = self.channels
            t = t.view(shape)
        return x - t

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, channel_dim={self.channel_dim}, "
                f"init={self.init_method}")


class StochasticSignActPerTensorConst(SignedBinaryActPerTensorConst):
    """Stochastic sign activation quantizer, per-tensor constant scale 1, no threshold.

    Use it as ``act_quant=`` of ``QuantIdentity`` or ``input_quant=`` of any Brevitas layer;
    exports as ``BipolarQuant`` with scale 1. Options are injector attributes (override with
    ``.let(...)`` or layer kwargs): ``sign_noise_std``, ``sign_temperature``,
    ``sign_learn_noise_std``, ``sign_mode``, ``sign_propagate_moments``, ``sign_eps``.
    """
    tensor_quant = StochasticBinaryQuant
    min_val = -1.0
    max_val = 1.0
    sign_noise_std = 1.0
    sign_temperature = 1.0
    sign_learn_noise_std = False
    sign_mode = "auto"
    sign_propagate_moments = True
    sign_eps = DEFAULT_EPS


class StochasticSignThresholdActPerChannelConst(StochasticSignActPerTensorConst):
    """Stochastic sign with a learnable per-channel threshold (``act_impl = ThresholdShift``).

    Needs a layer that keeps the injector's ``act_impl`` (``lr_quant.nn.StochasticSign``,
    or Brevitas' ``QuantNonLinearActLayer`` family); set ``threshold_channels``. As a
    layer's ``input_quant`` Brevitas drops ``act_impl``: use :func:`attach_threshold`.
    """
    act_impl = ThresholdShift
    passthrough_act = True
    threshold_channels = None
    threshold_channel_dim = 1
    threshold_init = "median"
    threshold_learnable = True


def attach_threshold(proxy: nn.Module, threshold_channels: Optional[int] = None,
                     threshold_channel_dim: int = 1, threshold_init: str = "median",
                     threshold_learnable: bool = True) -> ThresholdShift:
    """Put a ThresholdShift before the quantizer of a stock act proxy (e.g. a layer's
    ``input_quant``, where Brevitas forces ``act_impl=None``). Export then emits
    ``Sub -> BipolarQuant``. Returns the new module (its parameters join the layer's)."""
    fused = getattr(proxy, "fused_activation_quant_proxy", None)
    if fused is None:
        raise ValueError("attach_threshold needs an enabled Brevitas activation quant proxy")
    shift = ThresholdShift(threshold_channels, threshold_channel_dim, threshold_init,
                           threshold_learnable)
    fused.activation_impl = shift
    # Brevitas rebuilds the fused proxy from its injector (e.g. when a state dict loads):
    # record the instance there so the rebuild keeps this very module and its parameters.
    proxy.quant_injector = proxy.quant_injector.let(act_impl=shift)
    return shift


def sign_quant_modules(model: nn.Module) -> Iterator[StochasticBinaryQuant]:
    """Every StochasticBinaryQuant inside model."""
    return (m for m in model.modules() if isinstance(m, StochasticBinaryQuant))


def set_sign_temperature(model: nn.Module, tau: float) -> int:
    """Set tau on every stochastic sign of model; returns how many were set."""
    return _set_on_signs(model, StochasticBinaryQuant.set_temperature, tau)


def set_sign_noise_std(model: nn.Module, sigma: float) -> int:
    """Set sigma_a on every stochastic sign of model; returns how many were set."""
    return _set_on_signs(model, StochasticBinaryQuant.set_noise_std, sigma)


def _set_on_signs(model: nn.Module, setter, value: float) -> int:
    signs = list(sign_quant_modules(model))
    for m in signs:
        setter(m, value)
    return len(signs)


@dataclass(frozen=True)
class ParamSchedule:
    """A scalar going from ``start`` to ``end`` over ``steps`` steps, then staying at end.

    kind: "constant" (start), "linear", "cosine" (half cosine) or "exponential" (geometric;
    start and end > 0). ``schedule(step)`` returns the value.
    """
    start: float
    end: float
    steps: int
    kind: str = "linear"

    KINDS = ("constant", "linear", "cosine", "exponential")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"schedule kind must be one of {self.KINDS}, got {self.kind!r}")
        if int(self.steps) < 1:
            raise ValueError(f"schedule steps must be >= 1, got {self.steps}")
        if not (math.isfinite(self.start) and math.isfinite(self.end)):
            raise ValueError("schedule start and end must be finite")
        if self.kind == "exponential" and (self.start <= 0 or self.end <= 0):
            raise ValueError("exponential schedule needs start > 0 and end > 0")

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        r = min(step, self.steps) / self.steps
        if self.kind == "constant":
            return float(self.start)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * r
        if self.kind == "cosine":
            return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * r))
        return self.start * (self.end / self.start) ** r
