"""Learned per-channel thresholds in front of binary and ternary activation quantizers.

Both run as the ``act_impl`` of Brevitas' stock activation proxy, i.e. *before* the tensor
quantizer, so Brevitas exports them as plain ONNX ops in front of the quantizer node:

- ``ThresholdShift``: ``x - t`` (ReActNet's RSign shift). With a sign quantizer
  (x >= 0 -> +1) it gives ``sign(x - t)``; export ``Sub -> BipolarQuant(scale 1)``.
- ``TernaryThreshold``: ``u = (x - c) * 0.5 / t`` with a learned centre c and half-width
  t > 0 per channel. A 2-bit narrow signed quantizer with scale 1 (``clip(round(u), -1,
  1)``, rounding half to even like QONNX ``Quant``) then gives

      x > c + t -> +1,    x < c - t -> -1,    |x - c| <= t -> 0

  i.e. two thresholds c -+ t (any pair lo < hi); export ``Sub -> Mul -> Quant(scale 1,
  2 bit, narrow, signed)``, which FINN turns into a 2-threshold ``MultiThreshold``.

Thresholds initialize from data on the first forward in training mode (or
:meth:`ThresholdShift.init_from_data`, or :func:`calibrate_thresholds` for every threshold of a
model at once); a loaded state dict keeps its (initialized) values.
Binary inits: "median" (P(+1) = 1/2 per channel), "mean", "zero". Ternary inits: "median"
(thresholds at the 1/3 and 2/3 quantiles: the three values equally likely), "mean"
(c = mean, t = Phi^-1(2/3) std: equiprobable for a Gaussian), "zero" (c = 0, t = 0.5, i.e.
round(x)). Channels where the data would make the output constant or drop a value (a ReLU
output with a median of 0) get the most balanced non-degenerate split
(:meth:`ThresholdShift.balance_degenerate`).

# References
- Liu et al. "ReActNet: Towards Precise Binary Neural Network with Generalized Activation
  Functions". ECCV 2020 (RSign: learnable per-channel threshold).
- Li, Zhang, Liu. "Ternary Weight Networks". 2016 (symmetric thresholds +-t).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from brevitas import config as brevitas_config

from lr_quant._tensor import as_tensor
from lr_quant.moments import MomentTensor, split_moments

__all__ = [
    "THRESHOLD_INITS",
    "MIN_HALF_WIDTH",
    "ThresholdShift",
    "TernaryThreshold",
    "UnsignedTernaryThreshold",
    "attach_threshold",
    "calibrate_thresholds",
]

THRESHOLD_INITS = ("median", "mean", "zero")
#: smallest half-width of a ternary dead zone (keeps 0.5 / t finite)
MIN_HALF_WIDTH = 1e-6
#: Phi^-1(2/3): +-this many std split a Gaussian into three equally likely parts
_GAUSS_TERTILE = 0.4307272992954576


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


def _plain_detached(x: Tensor) -> Tensor:
    x, _ = split_moments(x)   # the mean of a MomentTensor, the tensor itself otherwise
    if isinstance(x, MomentTensor):
        x = x.plain()
    return x.detach()


class ThresholdShift(_TolerateMissingKeys, nn.Module):
    """x - t with a learnable threshold t per channel (or per tensor), initialized from data.

    ``sign(x - t)`` is the thresholded sign (ReActNet's RSign); for a Gaussian input
    N(m, v) it gives P(+1) = Phi((m - t)/sqrt(v)), and ``x - t`` keeps a MomentTensor's
    moments. A sign after a ReLU needs t > 0 (sign(ReLU(a) - t) = sign(a - t) then).

    Args:
        threshold_channels: number of channels, or None for one per-tensor threshold.
        threshold_channel_dim: channel axis of the input (1 for NC / NCHW).
        threshold_init: "median" (default), "mean" or "zero" (see the module docstring).
        threshold_learnable: train the threshold(s) (default) or keep them after init.
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
        self.learnable = bool(threshold_learnable)
        self.threshold = self._new_tensor(0.0)
        self.register_buffer("initialized", torch.tensor(threshold_init == "zero"))
        self._known_initialized = False   # host-side cache of `initialized` (no device sync)

    def _new_tensor(self, value: float):
        t = torch.full((self.channels or 1,), float(value))
        return nn.Parameter(t) if self.learnable else nn.Buffer(t)

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

    def _per_channel(self, x: Tensor) -> Tensor:
        """x as [channels (or 1), everything else]."""
        if self.channels is None:
            return x.reshape(1, -1)
        return x.movedim(self.channel_dim, 0).reshape(self.channels, -1)

    def _broadcast(self, t: Tensor, x: Tensor) -> Tensor:
        if self.channels is None:
            return t
        shape = [1] * x.dim()
        shape[self.channel_dim] = self.channels
        return t.view(shape)

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Set the threshold(s) from a batch by the init method (see the module docstring)."""
        x = _plain_detached(x)
        if not torch.isfinite(x).all():
            raise ValueError("threshold initialization got non-finite inputs (nan or inf)")
        self._check_shape(x)
        self._set_from(self._per_channel(x))
        self.initialized.fill_(True)
        self._known_initialized = True

    def _set_from(self, flat: Tensor) -> None:
        if self.init_method == "zero":
            value = torch.zeros_like(self.threshold)
        elif self.init_method == "median":
            value = flat.median(dim=1).values
        else:
            value = flat.mean(dim=1)
        self.threshold.copy_(value.to(self.threshold))

    @torch.no_grad()
    def balance_degenerate(self, x: Tensor) -> int:
        """Channels where ``sign(x - t)`` is constant on x (a ReLU output whose median is 0):
        move t to the midpoint between the minimum and the next larger value, the split
        closest to P(+1) = 1/2 that is not constant. Returns how many were moved."""
        x = _plain_detached(x)
        self._check_shape(x)
        return self._balance_flat(self._per_channel(x))

    def _balance_flat(self, flat: Tensor) -> int:
        t = self.threshold.detach().reshape(-1, 1).to(flat)
        constant = (flat >= t).all(dim=1) | (flat < t).all(dim=1)
        moved = 0
        for c in torch.nonzero(constant).flatten().tolist():
            values = flat[c]
            low = values.min()
            above = values[values > low]
            if above.numel():
                self.threshold[c] = 0.5 * (low + above.min())
                moved += 1
        return moved

    def reset(self) -> None:
        """Re-initialize from the next training batch."""
        self.initialized.fill_(self.init_method == "zero")
        self._known_initialized = False

    def _prepare(self, x: Tensor) -> None:
        if self.training and not self._is_initialized():
            self.init_from_data(x)
        self._check_shape(x)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 0:   # Brevitas' zero-hw sentinel when it reads the scale
            return x - self.threshold.mean()
        self._prepare(x)
        return x - self._broadcast(self.threshold, x)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, channel_dim={self.channel_dim}, "
                f"init={self.init_method}")


class TernaryThreshold(ThresholdShift):
    """u = (x - c) * 0.5 / t: two learned thresholds c -+ t per channel for a ternary
    quantizer ``clip(round(u), -1, 1)`` (+1 above c + t, -1 below c - t, 0 in between).

    ``threshold`` holds the centre c, ``half_width`` the half-width t, used as
    ``max(|t|, MIN_HALF_WIDTH)`` (an optimizer step may cross 0). Both are affine in x, so
    a MomentTensor keeps its moments: a Gaussian N(m, v) gives
    P(+1) = Phi((m - c - t)/sqrt(v)), P(-1) = Phi((c - t - m)/sqrt(v)). Same arguments as
    :class:`ThresholdShift`.
    """

    def __init__(self, threshold_channels: Optional[int] = None, threshold_channel_dim: int = 1,
                 threshold_init: str = "median", threshold_learnable: bool = True):
        super().__init__(threshold_channels, threshold_channel_dim, threshold_init,
                         threshold_learnable)
        self.half_width = self._new_tensor(0.5)

    def scale(self) -> Tensor:
        """0.5 / t, the factor after the centre shift (1 at the quantizer = t away)."""
        # torch.maximum, not clamp_min: qonnx folds Max of constants, not Clip(x, min, "")
        half = self.half_width.abs()
        return 0.5 / torch.maximum(half, half.new_tensor(MIN_HALF_WIDTH))

    def _set_from(self, flat: Tensor) -> None:
        if self.init_method == "zero":
            centre, half = torch.zeros(len(flat)), torch.full((len(flat),), 0.5)
        elif self.init_method == "median":
            ordered = flat.sort(dim=1).values
            last = ordered.shape[1] - 1
            lo, hi = _above_order_statistic(ordered, last // 3), \
                _above_order_statistic(ordered, (2 * last) // 3)
            centre, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
        else:
            centre, half = flat.mean(dim=1), _GAUSS_TERTILE * flat.std(dim=1, correction=0)
        self.threshold.copy_(centre.to(self.threshold))
        self.half_width.copy_(half.clamp_min(MIN_HALF_WIDTH).to(self.half_width))
        if self.init_method != "zero":
            self._balance_flat(flat)

    def _balance_flat(self, flat: Tensor) -> int:
        """Channels where one of the three values never occurs (ties, e.g. a ReLU output
        that is 0 in more than a third of the positions): put the two thresholds between
        distinct values so that the three fractions are closest to 1/3 each (least squares;
        all three values occur when the channel has >= 3 distinct values). Returns how many
        channels moved."""
        flat = flat.to(self.threshold)
        centre = self.threshold.detach().reshape(-1, 1)
        u = (flat - centre) * self.scale().detach().reshape(-1, 1)
        degenerate = ~((u < -0.5).any(1) & (u.abs() <= 0.5).any(1) & (u > 0.5).any(1))
        moved = 0
        for c in torch.nonzero(degenerate).flatten().tolist():
            values, counts = torch.unique(flat[c], return_counts=True)   # sorted
            if len(values) < 3:
                continue
            i, j = _balanced_split(counts.cumsum(0)[:-1].double() / counts.sum())
            lo = 0.5 * (values[i] + values[i + 1])
            hi = 0.5 * (values[j] + values[j + 1])
            self.threshold[c] = 0.5 * (lo + hi)
            self.half_width[c] = max(0.5 * float(hi - lo), MIN_HALF_WIDTH)
            moved += 1
        return moved

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 0:   # Brevitas' zero-hw sentinel when it reads the scale
            return (x - self.threshold.mean()) * self.scale().mean()
        self._prepare(x)
        return (x - self._broadcast(self.threshold, x)) * self._broadcast(self.scale(), x)


class UnsignedTernaryThreshold(TernaryThreshold):
    """u + 1 = (x - c) * 0.5 / t + 1: the same two thresholds c -+ t for a quantizer on
    {0, 1, 2} (``clip(round(u + 1), 0, 2)``); export ``Sub -> Mul -> Add -> Quant(scale 1,
    2 bit, narrow, unsigned)``."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + 1.0


def _above_order_statistic(ordered: Tensor, k: int) -> Tensor:
    """Per row of `ordered` (sorted rows): the midpoint between the k-th value and the next
    larger one (the k-th value where none is larger). A threshold there sits on no value of
    the batch, so integer-valued inputs (a sum of two ternary tensors) never tie with it:
    PyTorch's round-half-even and FINN's ``x >= threshold`` would disagree on a tie."""
    a = ordered[:, k:k + 1]
    j = torch.searchsorted(ordered, a.contiguous(), right=True).clamp(max=ordered.shape[1] - 1)
    b = ordered.gather(1, j)
    return (0.5 * (a + torch.where(b > a, b, a))).squeeze(1)


def _balanced_split(cdf: Tensor):
    """Splits i < j (after sorted distinct values i and j; ``cdf[k]`` = fraction <= value k)
    minimizing sum of (bin fraction - 1/3)^2 over the three bins. For a given i the best j
    is the one whose cdf is nearest (1 + cdf[i]) / 2 (the rest split in halves)."""
    last = len(cdf) - 1                      # j <= last, i <= last - 1
    i = torch.arange(last)
    target = 0.5 * (1.0 + cdf[:last])
    above = torch.searchsorted(cdf, target).clamp(max=last)
    candidates = torch.stack([above, above - 1]).maximum(i + 1)   # j > i
    f_i, f_j = cdf[i], cdf[candidates]
    cost = (f_i - 1 / 3) ** 2 + (f_j - f_i - 1 / 3) ** 2 + (1 - f_j - 1 / 3) ** 2
    best = cost.flatten().argmin()
    row, col = divmod(int(best), last)
    return col, int(candidates[row, col])


def attach_threshold(proxy: nn.Module, threshold_channels: Optional[int] = None,
                     threshold_channel_dim: int = 1, threshold_init: str = "median",
                     threshold_learnable: bool = True,
                     threshold_class: type = ThresholdShift) -> ThresholdShift:
    """Put a threshold module (``ThresholdShift`` or ``TernaryThreshold``) before the
    quantizer of a stock act proxy (e.g. a layer's ``input_quant``, where Brevitas forces
    ``act_impl=None``); export then emits ``Sub -> BipolarQuant`` (or ``Sub -> Mul ->
    Quant``). Returns the new module (its parameters join the layer's)."""
    fused = getattr(proxy, "fused_activation_quant_proxy", None)
    if fused is None:
        raise ValueError("attach_threshold needs an enabled Brevitas activation quant proxy")
    if not (isinstance(threshold_class, type) and issubclass(threshold_class, ThresholdShift)):
        raise TypeError(f"threshold_class must be a ThresholdShift subclass, got {threshold_class!r}")
    shift = threshold_class(threshold_channels, threshold_channel_dim, threshold_init,
                            threshold_learnable)
    fused.activation_impl = shift
    record_act_impl(proxy)
    return shift


def record_act_impl(proxy: nn.Module) -> None:
    """Brevitas rebuilds an act proxy's fused quantizer from its injector (e.g. when a state
    dict loads): record the current ``act_impl`` *instance* there, so the rebuild keeps this
    very module and its parameters (an optimizer holding them stays valid)."""
    impl = proxy.fused_activation_quant_proxy.activation_impl
    proxy.quant_injector = proxy.quant_injector.let(act_impl=impl)


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, batch: Tensor, train_mode: bool = True) -> int:
    """Initialize every sign threshold (ThresholdShift) of `model` from `batch`.

    Thresholds are set in network order in one forward pass (each from the inputs it sees
    given the thresholds before it), by their init method ("median" by default: P(+1) = 1/2
    per channel), and a channel where that gives a constant sign (e.g. a median of 0 after
    a ReLU) gets the most balanced non-constant split instead. `train_mode=True` runs the
    pass in training mode (BatchNorm batch statistics, as the first training step sees;
    BatchNorm running statistics and the RNG state are restored afterwards). Returns the
    number of thresholds set.
    """
    shifts = [m for m in model.modules() if isinstance(m, ThresholdShift)]
    if not shifts:
        return 0
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    handles = []

    def pre(module, args):
        x = as_tensor(args[0])
        if not isinstance(x, Tensor) or x.dim() == 0:
            return
        module.init_from_data(x)
        if module.init_method != "zero":
            module.balance_degenerate(x)

    for s in shifts:
        handles.append(s.register_forward_pre_hook(pre))
    training = model.training
    try:
        model.train(train_mode)
        with torch.random.fork_rng(devices=[]):
            model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
        for m, state in zip(norms, saved):
            for k, v in state.items():
                getattr(m, k).copy_(v)
    return len(shifts)
