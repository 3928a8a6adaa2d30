"""Noise-calibrated initialization: sharpen each LR layer's weight distributions until its
pre-activations carry more signal than sampling noise.

Shayer's initialization maps a pretrained weight w (normalized by the layer's std) linearly
to probabilities, so every weight with |w| < 1 stays uncertain. In a wide layer the
local-reparameterization noise v = A(x^2; Var[w]) then swamps the part of the mean
m = A(x; E[w]) that varies across inputs: measured on a timm resnet10t at 32x32, the
signal-to-noise ratio (functional.preactivation_snr)

    snr_c = Var_inputs(m_c) / E[v_c]

is 2-5 in the first blocks but 0.01-0.1 in layer4 and the 1x1 downsample convs. Training
then optimizes a network that is mostly noise in those layers, far from the deployed mode
network (the stochastic network's training accuracy stays ~15 points below an STE
network's).

`calibrate_sharpness(model, batch, target_snr)` gives every LR layer the smallest gain g of
a geometric grid such that the median channel SNR reaches `target_snr`, and replaces the
distribution p_k by the tempered p_k^g / sum_j p_j^g (WeightDistribution.sharpen: same
mode, so the initial discrete network is unchanged; lower variance). The inputs are those
of the deterministic mode network on `batch` (BatchNorm batch statistics, deterministic
activation quantizers), one forward pass of a copy of the model.
"""

from __future__ import annotations

import copy
from typing import Dict, Sequence

import torch
from torch import Tensor, nn

from .freeze import freeze
from .functional import preactivation_snr
from .nn.lr_layers import lr_layers
from .quant.activation import sign_quant_modules

__all__ = ["calibrate_sharpness", "SHARPNESS_GAINS"]

SHARPNESS_GAINS: Sequence[float] = (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@torch.no_grad()
def calibrate_sharpness(model: nn.Module, batch: Tensor, target_snr: float,
                        gains: Sequence[float] = SHARPNESS_GAINS) -> Dict[str, float]:
    """Sharpen every trainable LR layer of `model` to a median channel SNR >= target_snr
    (the largest gain where it is never reached); returns {layer name: gain}."""
    if not target_snr > 0:
        raise ValueError(f"target_snr must be > 0, got {target_snr}")
    gains = sorted(float(g) for g in gains)
    if not gains or gains[0] < 1:
        raise ValueError(f"sharpening gains must be >= 1, got {gains}")
    layers = {name: layer for name, layer in lr_layers(model) if not layer.is_lr_frozen}
    if not layers:
        return {}
    probe = copy.deepcopy(model)
    freeze(probe, "mode")
    probe.train()
    for quant in sign_quant_modules(probe):
        quant.eval()   # deterministic signs: the activations the mode network sees
    chosen: Dict[str, float] = {}

    def measure(name: str):
        layer = layers[name]

        def hook(module, args, output):
            x = getattr(output, "value", output)
            dim = -1 if isinstance(layer, nn.Linear) else 1   # output channels
            for gain in gains:
                logits = layer.lr_distribution.sharpen(layer.weight_logits, gain)
                mean, var = layer.preactivation_moments(x, logits)
                if preactivation_snr(mean, var, dim).median() >= target_snr:
                    break
            chosen[name] = gain
        return hook

    handles = [layer.input_quant.register_forward_hook(measure(name))
               for name, layer in lr_layers(probe) if name in layers]
    try:
        with torch.random.fork_rng(devices=[]):
            probe(batch)
    finally:
        for h in handles:
            h.remove()
    for name, gain in chosen.items():
        if gain != 1:
            layers[name].sharpen_(gain)
    return chosen
