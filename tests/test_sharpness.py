"""calibrate_sharpness: noise-calibrated tempering of LR weight distributions at conversion."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lr_quant.convert import convert_with_report
from lr_quant.freeze import freeze
from lr_quant.nn import lr_layers
from lr_quant.sharpness import SHARPNESS_GAINS, calibrate_sharpness


def _snr_oracle(layer, x, logits):
    """Median channel SNR computed directly: moments by enumerating the value set, the conv
    by F.conv2d with the layer's geometry, Var over (batch, positions) / mean noise."""
    dist = layer.lr_distribution
    p = dist.probabilities(logits.double())
    values = torch.tensor(dist.values, dtype=torch.float64).view(-1, *([1] * (p.dim() - 1)))
    mean_w = (p * values).sum(0)
    var_w = (p * (values - mean_w).square()).sum(0)
    scale = layer.lr_scale()
    if scale is not None:
        mean_w, var_w = mean_w * scale.double(), var_w * scale.double().square()
    kw = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
              groups=layer.groups)
    m = F.conv2d(x.double(), mean_w, **kw)
    v = F.conv2d(x.double().square(), var_w, **kw)
    snr = m.transpose(0, 1).flatten(1).var(1) / v.transpose(0, 1).flatten(1).mean(1)
    return snr.median().item()


def _mode_inputs(model, x):
    """Inputs of every LR layer (after its input quantizer) in the frozen mode network,
    BatchNorm in batch-statistics mode, activations deterministic."""
    probe = copy.deepcopy(model)
    freeze(probe, "mode")
    probe.train()
    for m in probe.modules():
        if type(m).__name__.startswith("Stochastic"):
            m.eval()
    seen = {}
    for name, layer in lr_layers(probe):
        layer.input_quant.register_forward_hook(
            lambda mod, a, out, n=name: seen.__setitem__(n, getattr(out, "value", out)))
    with torch.no_grad():
        probe(x)
    return seen


@pytest.mark.parametrize("recipe,target", [("resnet_w2", 4.0), ("resnet_w1a1_stochastic", 4.0),
                                           ("resnet_w1", 30.0)])
def test_each_layer_gets_the_smallest_gain_that_reaches_the_target(recipe, target):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    model, _ = convert_with_report(model, recipe)
    x = torch.randn(16, 3, 32, 32)
    before = {n: l.weight_logits.detach().clone() for n, l in lr_layers(model)}
    inputs = _mode_inputs(model, x)
    model.eval()
    with torch.no_grad():
        mode_out = model(x)
    bn = model.layer1[0].bn1
    bn_state = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    rng = torch.get_rng_state()

    gains = calibrate_sharpness(model, x, target)

    assert set(gains) == {n for n, _ in lr_layers(model)}
    assert len(set(gains.values())) > 1 or recipe == "resnet_w1"   # per-layer, not global
    grid = list(SHARPNESS_GAINS)
    for name, layer in lr_layers(model):
        g = gains[name]
        dist = layer.lr_distribution
        torch.testing.assert_close(layer.weight_logits.detach(),
                                   dist.sharpen(before[name], g).to(layer.weight_logits.dtype))
        snr = _snr_oracle(layer, inputs[name], dist.sharpen(before[name], g))
        if g < grid[-1]:
            assert snr >= target * (1 - 1e-6), (name, g, snr)
        k = grid.index(g)
        if k > 0:   # the previous gain of the grid did not reach it
            assert _snr_oracle(layer, inputs[name], dist.sharpen(before[name], grid[k - 1])) \
                < target * (1 + 1e-6), (name, g)
    # same discrete network, untouched BatchNorm statistics and RNG
    with torch.no_grad():
        torch.testing.assert_close(model(x), mode_out)
    assert torch.equal(bn.running_mean, bn_state[0]) and torch.equal(bn.running_var, bn_state[1])
    assert torch.equal(bn.num_batches_tracked, bn_state[2])
    assert torch.equal(torch.get_rng_state(), rng)


def test_unreachable_target_takes_the_largest_gain_and_frozen_layers_are_left_alone():
    torch.manual_seed(1)
    model = timm.create_model("test_resnet", num_classes=10)
    model, _ = convert_with_report(model, "resnet_w1")
    frozen_name, frozen = next(iter(lr_layers(model)))
    frozen.freeze("mode")
    kept = frozen.weight_logits.detach().clone()
    gains = calibrate_sharpness(model, torch.randn(8, 3, 32, 32), 1e12, gains=(1, 2, 4))
    assert frozen_name not in gains and torch.equal(frozen.weight_logits, kept)
    assert set(gains.values()) == {4.0}


@pytest.mark.parametrize("kwargs,match", [(dict(target_snr=0.0), "target_snr must be > 0"),
                                          (dict(target_snr=1.0, gains=(0.5, 2)), "gains must be >= 1")])
def test_bad_arguments(kwargs, match):
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=match):
        calibrate_sharpness(model, torch.randn(2, 3, 8, 8), **kwargs)
