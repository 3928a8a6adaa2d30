"""QuantIdentity-style Brevitas layers for binary (+-1) and ternary ({-1, 0, +1}) activations.

    StochasticSign:         y = sign(x - t)                        (x - t >= 0 -> +1)
    StochasticTernarySign:  y = +1 if x > c + t, -1 if x < c - t, else 0

t (and c) are learnable per-channel thresholds initialized from data
(``lr_quant.quant.threshold``). In ``train()`` the activation is stochastic
(``lr_quant.quant.activation``: moment mode for a ``MomentTensor`` input, noise mode
x + N(0, sigma_a^2) otherwise); in ``eval()`` it is deterministic. QONNX export:
``Sub(x, t) -> BipolarQuant(scale 1)`` and ``Sub(x, c) -> Mul(0.5 / t) -> Quant(scale 1,
2 bit, narrow, signed)``. Both are Brevitas ``QuantNonLinearActLayer`` s with the stock act
proxy, so Brevitas' graph utilities and export handle them like QuantIdentity.
"""

from __future__ import annotations

from typing import Optional

from brevitas.nn.quant_layer import QuantNonLinearActLayer

from lr_quant.quant.activation import (
    StochasticActQuant,
    StochasticSignActPerTensorConst,
    StochasticSignThresholdActPerChannelConst,
    StochasticTernaryActPerTensorConst,
    StochasticTernaryThresholdActPerChannelConst,
)
from lr_quant.quant.threshold import TernaryThreshold, ThresholdShift, record_act_impl

__all__ = ["StochasticSign", "StochasticTernarySign"]


class StochasticSign(QuantNonLinearActLayer):
    """Binary activation with a learned threshold, stochastic in training.

    Args:
        num_channels: channels of the threshold (None: one per-tensor threshold).
        threshold: False for no threshold (plain sign(x)).
        channel_dim: channel axis of the input (1 for NC and NCHW).
        threshold_init: "median" (default), "mean" or "zero"; done on the first training
            batch (or call ``self.threshold_module.init_from_data(x)``).
        noise_std: sigma_a of the noise mode; temperature: tau of the relaxation.
        learn_noise_std: make sigma_a trainable.
        mode: "auto" (moments if the input has them, noise otherwise), "noise", "moment".
        propagate_moments: training output is a MomentTensor (mean and variance of y).
        act_quant: the injector (default: the threshold variant or the plain one).
        **kwargs: further injector overrides, as for Brevitas layers.
    """
    QUANT_WITH_THRESHOLD = StochasticSignThresholdActPerChannelConst
    QUANT_WITHOUT_THRESHOLD = StochasticSignActPerTensorConst
    THRESHOLD_CLASS = ThresholdShift

    def __init__(
            self,
            num_channels: Optional[int] = None,
            threshold: bool = True,
            channel_dim: int = 1,
            threshold_init: str = "median",
            noise_std: float = 1.0,
            temperature: float = 1.0,
            learn_noise_std: bool = False,
            mode: str = "auto",
            propagate_moments: bool = True,
            act_quant=None,
            return_quant_tensor: bool = False,
            **kwargs):
        if act_quant is None:
            act_quant = self.QUANT_WITH_THRESHOLD if threshold else self.QUANT_WITHOUT_THRESHOLD
        QuantNonLinearActLayer.__init__(
            self,
            act_impl=self.THRESHOLD_CLASS if threshold else None,
            passthrough_act=True,
            input_quant=None,
            act_quant=act_quant,
            return_quant_tensor=return_quant_tensor,
            threshold_channels=num_channels,
            threshold_channel_dim=channel_dim,
            threshold_init=threshold_init,
            sign_noise_std=noise_std,
            sign_temperature=temperature,
            sign_learn_noise_std=learn_noise_std,
            sign_mode=mode,
            sign_propagate_moments=propagate_moments,
            **kwargs)
        if threshold:
            # a state-dict load rebuilds the proxy from its injector: keep this threshold
            record_act_impl(self.act_quant)

    @property
    def sign_quant(self) -> StochasticActQuant:
        return self.act_quant.fused_activation_quant_proxy.tensor_quant

    @property
    def threshold_module(self) -> Optional[ThresholdShift]:
        impl = self.act_quant.fused_activation_quant_proxy.activation_impl
        return impl if isinstance(impl, ThresholdShift) else None

    def set_temperature(self, tau: float) -> None:
        self.sign_quant.set_temperature(tau)

    def set_noise_std(self, sigma: float) -> None:
        self.sign_quant.set_noise_std(sigma)


class StochasticTernarySign(StochasticSign):
    """Ternary activation {-1, 0, +1} with learned per-channel thresholds c -+ t (a
    ``TernaryThreshold``: ``threshold_module.threshold`` is c, ``.half_width`` is t),
    stochastic in training. ``threshold=False`` gives fixed thresholds +-1/2
    (``clip(round(x), -1, 1)``). The noise mode's sigma_a is in units of 2t. Other
    arguments as :class:`StochasticSign`; threshold inits: "median" (1/3 and 2/3
    quantiles), "mean" (mean -+ 0.43 std), "zero" (+-1/2).
    """
    QUANT_WITH_THRESHOLD = StochasticTernaryThresholdActPerChannelConst
    QUANT_WITHOUT_THRESHOLD = StochasticTernaryActPerTensorConst
    THRESHOLD_CLASS = TernaryThreshold
