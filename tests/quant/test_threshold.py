"""Tests of lr_quant.quant.threshold: learned thresholds before binary / ternary quantizers."""

import math

import pytest
import timm
import torch
from torch import nn

from lr_quant.convert import convert_with_report
from lr_quant.functional.sign import ternary_sign
from lr_quant.moments import MomentTensor
from lr_quant.quant.threshold import (MIN_HALF_WIDTH, TernaryThreshold, ThresholdShift,
                                      attach_threshold, calibrate_thresholds)


def _bins(u):
    """Fractions of (-1, 0, +1) of the quantizer clip(round(u), -1, 1), per channel (dim 1)."""
    q = torch.clamp(torch.round(u), -1, 1)
    return torch.stack([(q == v).double().mean(0) for v in (-1.0, 0.0, 1.0)])


def test_ternary_threshold_is_two_thresholds_c_minus_plus_t():
    th = TernaryThreshold(3, threshold_init="zero")
    with torch.no_grad():
        th.threshold.copy_(torch.tensor([0.0, 1.0, -2.0]))
        th.half_width.copy_(torch.tensor([0.5, 0.25, 2.0]))
    x = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0)) * 2
    u = th(x)
    torch.testing.assert_close(u, (x - th.threshold) / (2 * th.half_width))
    q = torch.clamp(torch.round(u), -1, 1)
    # away from the thresholds (float rounding of u within an ulp) it is ternary_sign(x - c, t)
    far = ((x - th.threshold).abs() - th.half_width).abs() > 1e-5
    ref = ternary_sign(x - th.threshold, 0.0 * x + th.half_width)
    assert torch.equal(q[far], ref[far]) and far.float().mean() > 0.99
    # a negative half-width is used as |t| (an optimizer step may cross 0), 0 as MIN_HALF_WIDTH
    with torch.no_grad():
        th.half_width.copy_(torch.tensor([-0.5, 0.0, 2.0]))
    u = th(torch.tensor([[0.75, 1.0 + 1e-3, 0.0]]))
    assert u[0, 0].item() == 0.75 and u[0, 1].item() == pytest.approx(1e-3 * 0.5 / MIN_HALF_WIDTH, rel=1e-4)


def test_ternary_median_init_makes_three_equally_likely_values():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3001, 4, generator=g) * torch.tensor([1.0, 3.0, 0.2, 5.0]) + \
        torch.tensor([0.0, -4.0, 1.0, 10.0])
    th = TernaryThreshold(4).train()
    u = th(x)
    assert bool(th.initialized)
    assert (_bins(u) - 1 / 3).abs().max() < 2e-3      # tertiles: a third in each bin
    # "mean": c = mean, t = Phi^-1(2/3) std, equiprobable for a Gaussian
    thm = TernaryThreshold(4, threshold_init="mean").train()
    um = thm(x)
    torch.testing.assert_close(thm.threshold.detach(), x.mean(0))
    assert (_bins(um) - 1 / 3).abs().max() < 0.03
    z = 0.5 * (1 + math.erf(thm.half_width[0].item() / x[:, 0].std(correction=0).item()
                            / math.sqrt(2)))
    assert z == pytest.approx(2 / 3, abs=1e-6)
    # "zero": thresholds +-1/2 with no data
    thz = TernaryThreshold(4, threshold_init="zero").train()
    torch.testing.assert_close(thz(x), x)


def test_ternary_median_init_on_integer_data_puts_thresholds_between_values():
    """A residual sum of two ternary tensors takes integer values: the thresholds must fall
    between the values around the 1/3 and 2/3 order statistics (PyTorch rounds a tie half
    to even, FINN's MultiThreshold counts x >= threshold: a tie would differ), and the
    split is the one the order statistics give (oracle: the counts below each threshold)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randint(-1, 2, (999, 3), generator=g) + torch.randint(-1, 2, (999, 3), generator=g)
         ).float()
    th = TernaryThreshold(3).train()
    th(x)
    lo = (th.threshold - th.half_width).detach()
    hi = (th.threshold + th.half_width).detach()
    for c in range(3):
        values = x[:, c].unique()
        assert not torch.isin(torch.stack([lo[c], hi[c]]), values).any()
        ordered = x[:, c].sort().values
        k1, k2 = 998 // 3, (2 * 998) // 3
        # the lower threshold sits just above the k1-th value: everything <= it is below
        assert (x[:, c] < lo[c]).sum() == (x[:, c] <= ordered[k1]).sum()
        assert (x[:, c] < hi[c]).sum() == (x[:, c] <= ordered[k2]).sum()


def test_ternary_init_after_relu_ties_keeps_all_three_values():
    """A ReLU output is 0 in ~70% of the positions: the tertiles are both 0, which would
    leave out the value -1; the balanced split puts one threshold between 0 and the smallest
    positive value and the other at the cumulative fraction closest to 2/3."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2000, 3, generator=g) - 0.5244   # P(a > 0) = 0.3
    x = torch.relu(a)
    x[:, 2] = 0.0                                     # a dead channel: constant
    th = TernaryThreshold(3).train()
    u = th(x)
    bins = _bins(u)
    assert (bins[:, :2] > 0.05).all(), bins          # every value occurs on live channels
    # least squares: the ~30% positive values are split in halves between 0 and +1
    assert (bins[1, :2] - bins[2, :2]).abs().max() < 0.01, bins
    assert torch.isfinite(u).all() and (u[:, 2] == 0).all()   # constant channel: all 0
    assert torch.isfinite(th.half_width).all() and (th.half_width > 0).all()
    # the public hook says what it moved (nothing left to move now)
    assert th.balance_degenerate(x) == 0


def test_moments_pass_through_the_affine_threshold():
    th = TernaryThreshold(2, threshold_init="zero")
    with torch.no_grad():
        th.threshold.copy_(torch.tensor([0.5, -1.0]))
        th.half_width.copy_(torch.tensor([0.25, 1.0]))
    m, v = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 4.0]])
    y = th(MomentTensor.from_moments(m, v))
    torch.testing.assert_close(y.moment_mean, (m - th.threshold) / (2 * th.half_width))
    torch.testing.assert_close(y.moment_var, v / (2 * th.half_width) ** 2)


def test_gradients_reach_centre_and_half_width():
    th = TernaryThreshold(3).train()
    x = torch.randn(64, 3, requires_grad=True)
    th(x)   # init
    u = th(x)
    (u * torch.tensor([1.0, -2.0, 3.0])).sum().backward()
    for g in (x.grad, th.threshold.grad, th.half_width.grad):
        assert g is not None and torch.isfinite(g).all() and (g != 0).any()


def test_attach_threshold_with_a_class_and_bad_input():
    from brevitas.nn import QuantIdentity
    from lr_quant.quant.activation import StochasticTernaryActPerTensorConst

    q = QuantIdentity(act_quant=StochasticTernaryActPerTensorConst)
    th = attach_threshold(q.act_quant, 5, threshold_class=TernaryThreshold)
    assert isinstance(th, TernaryThreshold)
    assert q.act_quant.fused_activation_quant_proxy.activation_impl is th
    with pytest.raises(TypeError, match="threshold_class"):
        attach_threshold(q.act_quant, 5, threshold_class=nn.Identity)
    with pytest.raises(ValueError, match="enabled Brevitas activation quant proxy"):
        attach_threshold(nn.Identity(), 5)
    with pytest.raises(ValueError, match="threshold_init"):
        TernaryThreshold(3, threshold_init="tertile")
    with pytest.raises(ValueError, match="3 channels"):
        TernaryThreshold(3).train()(torch.randn(4, 5))
    with pytest.raises(ValueError, match="non-finite"):
        TernaryThreshold(2).train()(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]))
    # a fixed (non-learnable) threshold is a buffer and still initializes from data
    fixed = TernaryThreshold(2, threshold_learnable=False).train()
    fixed(torch.randn(30, 2) + 3)
    assert not list(fixed.parameters()) and fixed.threshold.mean() > 2


def test_binary_balance_degenerate_moves_a_constant_sign():
    x = torch.relu(torch.randn(500, 2, generator=torch.Generator().manual_seed(3)) - 0.5)
    sh = ThresholdShift(2).train()
    sh(x)   # median 0: x - 0 >= 0 everywhere, the sign is constant
    assert (x - sh.threshold >= 0).all()
    assert sh.balance_degenerate(x) == 2
    smallest_positive = torch.where(x > 0, x, torch.inf).min(0).values
    torch.testing.assert_close(sh.threshold.detach(), 0.5 * smallest_positive)


def test_calibrate_thresholds_balances_relu_inputs_and_restores_bn():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    model, _ = convert_with_report(model, "resnet_w1a1_stochastic")
    bn = model.layer1[0].bn1
    before = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    x = torch.randn(8, 3, 32, 32)
    calibrate_thresholds(model, x)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert torch.equal(bn.num_batches_tracked, before[2])
    # layer2.0.conv1 reads a ReLU output (kept: it also feeds the residual): >= half zeros
    # per channel, so the median is 0 and sign(x - 0) would be constant +1
    shift = model.layer2[0].conv1.input_quant.fused_activation_quant_proxy.activation_impl
    inputs = {}
    def grab(module, args):
        inputs.setdefault("x", args[0])
    shift.register_forward_pre_hook(grab)
    model.eval()
    with torch.no_grad():
        model(x)
    xin = inputs["x"]
    assert (xin >= 0).all()
    t = shift.threshold.detach().view(1, -1, 1, 1)
    frac = (xin >= t).float().mean((0, 2, 3))
    assert ((frac > 0) & (frac < 1)).float().mean() > 0.9
