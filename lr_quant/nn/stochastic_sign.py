"""``StochasticSign``: a QuantIdentity-style Brevitas layer for binary (+-1) activations.

    y = sign(x - t)          t: learnable per-channel threshold (ReActNet RSign shift)

In ``train()`` the sign is stochastic (``lr_quant.quant.activation.StochasticBinaryQuant``:
moment mode for a ``MomentTensor`` input, noise mode x + N(0, sigma_a^2) otherwise); in
``eval()`` it is deterministic, x - t >= 0 -> +1, and the QONNX export is
``Sub(x, t) -> BipolarQuant(scale=1)``. It is a Brevitas ``QuantNonLinearActLayer`` with
the stock act proxy, so Brevitas' graph utilities and export handle it like QuantIdentity.
"""

from __future__ import annotations

from typing import Optional

from brevitas.nn.quant_layer import QuantNonLinearActLayer

from lr_quant.quant.activation import (
    StochasticBinaryQuant,
    StochasticSignActPerTensorConst,
    StochasticSignThresholdActPerChannelConst,
    ThresholdShift,
)

__all__ = ["StochasticSign"]


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
        propagate_moments: training output is a MomentTensor (mean 2P-1, var 4P(1-P)).
        act_quant: the injector (default: the threshold variant or the plain one).
        **kwargs: further injector overrides, as for Brevitas layers.
    """

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
            act_quant = (StochasticSignThresholdActPerChannelConst
                         if threshold else StochasticSignActPerTensorConst)
        QuantNonLinearActLayer.__init__(
            self,
            act_impl=ThresholdShift if threshold else None,
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

    @property
    def sign_quant(self) -> StochasticBinaryQuant:
        return self.act_quant.fused_activation_quant_proxy.tensor_quant

    @property
    def threshold_module(self) -> Optional[ThresholdShift]:
        impl = self.act_quant.fused_activation_quant_proxy.activation_impl
        return impl if isinstance(impl, ThresholdShift) else None

    def set_temperature(self, tau: float) -> None:
        self.sign_quant.set_temperature(tau)

    def set_noise_std(self, sigma: float) -> None:
        self.sign_quant.set_noise_std(sigma)
