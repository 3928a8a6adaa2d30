"""Tests of lr_quant.moments.MomentTensor: contract, moment-preserving ops, timm blocks."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lr_quant.moments import MOMENT_PRESERVING_OPS, MomentTensor, has_moments, split_moments

R = 20_000   # Monte-Carlo replicas (the batch axis carries the replicas)


def _mc_check(x, mean, var, n=R, k=6.0):
    """Empirical mean / var over dim 0 of the samples x vs the propagated moments.

    Standard errors: mean sqrt(var / n); variance (Gaussian) var * sqrt(2 / (n - 1)).
    k = 6 standard errors over a few hundred elements keeps the seeded test stable while a
    wrong rule (a factor n or a missing term) is off by many tens of standard errors."""
    x = x.detach().double()
    emp_m, emp_v = x.mean(0), x.var(0)
    mean, var = mean.detach().double(), var.detach().double()
    assert ((emp_m - mean).abs() <= k * (var / n).sqrt() + 1e-6).all()
    assert ((emp_v - var).abs() <= k * var * math.sqrt(2 / (n - 1)) + 1e-6).all()


def _replicated(mean, var, n=R, generator=None):
    """A MomentTensor of n independent samples of N(mean, var) (same moments per replica)."""
    shape = (n,) + tuple(mean.shape)
    return MomentTensor.from_moments(mean.expand(shape).clone(), var.expand(shape).clone(),
                                     generator=generator)


class FakeLRConv(nn.Module):
    """Stand-in for an LR conv (the lead's layer) with the contract of lr_quant.moments:
    reads (m_x, v_x) with split_moments and returns MomentTensor.from_moments(m, v) with
    m = conv(m_x, mu_w), v = conv(m_x^2, var_w) + conv(v_x, mu_w^2 + var_w), sampled
    independently per output element (local reparameterization)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.mu = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.3)
        self.wvar = nn.Parameter(torch.rand(cout, cin, 3, 3) * 0.05)

    def forward(self, x):
        m_x, v_x = split_moments(x)
        if isinstance(m_x, MomentTensor):
            m_x = m_x.plain()
        m = F.conv2d(m_x, self.mu, padding=1)
        v = F.conv2d(m_x * m_x, self.wvar, padding=1)
        if v_x is not None:
            v = v + F.conv2d(v_x, self.mu ** 2 + self.wvar, padding=1)
        return MomentTensor.from_moments(m, v)


def test_contract_sample_moments_and_split():
    m = torch.randn(4, 5, requires_grad=True)
    v = torch.rand(4, 5, requires_grad=True)
    x = MomentTensor.from_moments(m, v)
    assert isinstance(x, MomentTensor) and x.shape == m.shape and has_moments(x)
    assert split_moments(x)[0] is m and split_moments(x)[1] is v
    plain = torch.randn(3)
    assert split_moments(plain)[0] is plain and split_moments(plain)[1] is None
    s = torch.randn(4, 5)
    y = MomentTensor.from_moments(m, v, sample=s)
    assert torch.equal(y.plain(), s)
    # the default sample is m + sqrt(v) e (reproducible with a generator)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = MomentTensor.from_moments(m, v, generator=g1)
    e = torch.randn(4, 5, generator=g2)
    assert torch.allclose(a.plain(), m + v.sqrt() * e)


def test_sample_distribution_and_zero_variance_gradient():
    x = _replicated(torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 0.25, 0.0]))
    _mc_check(x.plain(), x.moment_mean[0], x.moment_var[0])
    v = torch.zeros(3, requires_grad=True)
    y = MomentTensor.from_moments(torch.ones(3), v)
    (g,) = torch.autograd.grad(y.sum(), (v,))
    assert torch.isfinite(g).all()


def test_bad_construction():
    with pytest.raises(ValueError, match="var"):
        MomentTensor.from_moments(torch.zeros(3), -torch.ones(3))
    with pytest.raises(ValueError, match="shape"):
        MomentTensor.from_moments(torch.zeros(3), torch.ones(4))
    with pytest.raises(ValueError, match="sample"):
        MomentTensor.from_moments(torch.zeros(3), torch.ones(3), sample=torch.zeros(2))


def test_autograd_reaches_mean_and_var_through_ops():
    m = torch.randn(2, 3, 4, 4, requires_grad=True)
    v = torch.rand(2, 3, 4, 4, requires_grad=True)
    x = MomentTensor.from_moments(m, v)
    bn = nn.BatchNorm2d(3).eval()
    y = F.adaptive_avg_pool2d(bn(x * 2.0 + 1.0), 1).flatten(1)
    assert has_moments(y)
    loss = y.moment_mean.sum() + y.moment_var.sum() + y.sum()
    gm, gv = torch.autograd.grad(loss, (m, v))
    assert torch.isfinite(gm).all() and torch.isfinite(gv).all() and gv.abs().sum() > 0
    with torch.no_grad():
        z = bn(x) + x
    assert has_moments(z) and not z.requires_grad


def test_affine_add_and_mul_match_monte_carlo():
    g = torch.Generator().manual_seed(0)
    a = _replicated(torch.randn(6), torch.rand(6) + 0.1, generator=g)
    b = _replicated(torch.randn(6), torch.rand(6) + 0.1, generator=g)
    w = nn.Parameter(torch.randn(6))
    for y in (a * w + 3.0, 2.0 - a / 4.0, a + b, a - 2 * b, a * b, -a, torch.add(a, b, alpha=0.5)):
        assert has_moments(y)
        _mc_check(y.plain(), y.moment_mean[0], y.moment_var[0])
    c = a.clone()
    c += b   # in place, as in timm's `x += shortcut`
    assert has_moments(c)
    _mc_check(c.plain(), c.moment_mean[0], c.moment_var[0])


def test_non_preserving_ops_return_plain_and_in_place_invalidates():
    x = MomentTensor.from_moments(torch.randn(2, 3), torch.rand(2, 3))
    for y in (F.relu(x), torch.sigmoid(x), F.linear(x, torch.randn(4, 3)), x.exp(), x @ x.T):
        assert not isinstance(y, MomentTensor) or not has_moments(y)
    z = x.clone()
    z.relu_()
    assert isinstance(z, MomentTensor) and not has_moments(z)
    assert split_moments(z)[1] is None
    w = x.clone()
    w[0, 0] = 5.0
    assert not has_moments(w)
    u = x.clone()
    F.relu(u, inplace=True)
    assert not has_moments(u)


def test_batchnorm_eval_and_train_match_monte_carlo():
    g = torch.Generator().manual_seed(1)
    mean, var = torch.randn(3, 2, 2), torch.rand(3, 2, 2) + 0.2
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -2.0, 1.5]))
        bn.bias.copy_(torch.tensor([0.1, 0.0, -1.0]))
        bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.0]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.0]))
    x = _replicated(mean, var, generator=g)
    y = bn.eval()(x)
    _mc_check(y.plain(), y.moment_mean[0], y.moment_var[0])
    # training: the data is what F.batch_norm computes; the moments take the same affine map
    # built from the batch statistics of the sample (close to population ones for R replicas)
    y = bn.train()(x)
    assert has_moments(y)
    ref = F.batch_norm(x.plain(), None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    assert torch.allclose(y.plain(), ref, atol=1e-5)
    _mc_check(y.plain(), y.moment_mean[0], y.moment_var[0], k=8.0)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                                    dict(kernel_size=3, stride=2, padding=1,
                                         count_include_pad=False),
                                    dict(kernel_size=3, stride=2, ceil_mode=True),
                                    dict(kernel_size=2, divisor_override=3)])
def test_avg_pool_matches_monte_carlo(kwargs):
    g = torch.Generator().manual_seed(2)
    x = _replicated(torch.randn(2, 5, 5), torch.rand(2, 5, 5) + 0.1, n=8000, generator=g)
    y = F.avg_pool2d(x, **kwargs)
    assert has_moments(y)
    _mc_check(y.plain(), y.moment_mean[0], y.moment_var[0], n=8000)


@pytest.mark.parametrize("op", [lambda x: F.adaptive_avg_pool2d(x, (2, 3)),
                                lambda x: F.adaptive_avg_pool2d(x, 1).flatten(1),
                                lambda x: x.mean((2, 3)), lambda x: x.mean(-1, keepdim=True),
                                lambda x: torch.cat([x, x * 2], 1).permute(0, 2, 3, 1).flatten(1),
                                lambda x: x.sum(2), lambda x: F.dropout(x, 0.5, training=False)])
def test_pool_reduce_and_shape_ops_match_monte_carlo(op):
    g = torch.Generator().manual_seed(3)
    x = _replicated(torch.randn(2, 5, 5), torch.rand(2, 5, 5) + 0.1, n=8000, generator=g)
    y = op(x)
    assert has_moments(y)
    _mc_check(y.plain(), y.moment_mean[0], y.moment_var[0], n=8000)


def test_timm_basic_block_moments_match_monte_carlo():
    timm = pytest.importorskip("timm")
    from timm.models.resnet import BasicBlock
    from timm.layers import SelectAdaptivePool2d

    torch.manual_seed(0)
    block = BasicBlock(4, 4)
    block.conv1, block.conv2 = FakeLRConv(4, 4), FakeLRConv(4, 4)
    block.act1 = nn.Identity()   # a sign would go here; ReLU would drop the moments
    block.act2 = nn.Identity()
    for bn in (block.bn1, block.bn2):
        with torch.no_grad():
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    block.eval()
    seen = {}
    block.bn2.register_forward_hook(lambda mod, i, o: seen.__setitem__("bn2", o))
    pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)

    n = 6000
    x = torch.randn(1, 4, 5, 5).expand(n, 4, 5, 5).contiguous()   # deterministic block input
    with torch.no_grad():
        y = block(x)             # conv1 -> bn1 -> drop_block -> act1 -> aa -> conv2 -> bn2 -> += x
        p = pool(y)
    for t in (seen["bn2"], y, p):
        assert isinstance(t, MomentTensor) and has_moments(t)
        _mc_check(t.plain(), t.moment_mean[0], t.moment_var[0], n=n)
    # with the stock ReLU the block output is a plain tensor (the sample), never wrong moments
    block.act2 = nn.ReLU(inplace=True)
    with torch.no_grad():
        out = block(x[:2])
    assert not has_moments(out)


def test_whole_timm_resnet_accepts_a_moment_tensor():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    m = torch.randn(2, 3, 32, 32, requires_grad=True)
    v = torch.rand(2, 3, 32, 32, requires_grad=True)
    model.train()
    out = model(MomentTensor.from_moments(m, v))   # the stem conv drops the moments
    assert out.shape == (2, 5) and not has_moments(out)
    out.sum().backward()
    assert torch.isfinite(m.grad).all() and torch.isfinite(v.grad).all()
    model.eval()
    with torch.no_grad():
        assert not has_moments(model(MomentTensor.from_moments(m.detach(), v.detach())))


def test_preserving_op_list_is_exposed():
    assert F.batch_norm in MOMENT_PRESERVING_OPS and F.relu not in MOMENT_PRESERVING_OPS


def test_in_place_write_through_a_view_invalidates_moments():
    x = MomentTensor.from_moments(torch.randn(2, 3), torch.rand(2, 3))
    v = x.view(6)
    assert has_moments(v) and has_moments(x)
    v.relu_()    # mutates x's storage too
    assert not has_moments(v) and not has_moments(x) and x.moment_var is None
    y = MomentTensor.from_moments(torch.randn(2, 3), torch.rand(2, 3))
    y += 1.0     # preserving in-place op keeps (updated) moments
    assert has_moments(y)
    y.view(6).mul_(2.0)   # a view's in-place op updates the view only: the base is stale
    assert not has_moments(y)


# -- deferred samples (MomentTensor.deferred) ---------------------------------------------------

def _deferred(mean, var, eps=0.0):
    return MomentTensor.deferred(mean.clone().requires_grad_(), var.clone().requires_grad_(), eps)


def test_deferred_moments_follow_affine_ops_without_a_draw_and_one_sample_is_drawn_on_read():
    """Affine ops and metadata reads keep the sample undrawn (the generator does not move);
    the first op that reads the data draws N(m, v + eps) in place (Monte Carlo), every later
    reader sees that one sample, and gradients reach both moments through it."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(8, generator=g).expand(R, 8).contiguous()
    var = (torch.rand(8, generator=g) + 0.1).expand(R, 8).contiguous()
    x = _deferred(mean, var, eps=0.05)
    shift = torch.randn(8, generator=g)
    state = torch.get_rng_state()
    y = -(2.0 * x - shift)
    y += 1.0
    assert isinstance(y, MomentTensor) and y.is_deferred and x.is_deferred
    assert y.shape == x.shape and y.dim() == 2 and y.dtype == x.dtype and y.numel() == 8 * R
    assert y.requires_grad and y.device == x.device and y.is_deferred
    assert torch.zeros(1).type_as(y).dtype == y.dtype
    assert torch.equal(torch.get_rng_state(), state)          # nothing drawn so far
    torch.testing.assert_close(y.moment_mean, -(2.0 * x.moment_mean - shift) + 1.0)
    torch.testing.assert_close(y.moment_var, 4.0 * x.moment_var)
    first = F.relu(y)                                         # reads the data: draws y
    assert not y.is_deferred and x.is_deferred and has_moments(y)
    _mc_check(y.plain(), y.moment_mean[0], y.moment_var[0] + 0.05)   # eps: a floor
    assert torch.equal(F.relu(y), first) and torch.equal(y.plain().clamp(min=0), first)
    # d sample / d m = 1 and d sample / d v = e / (2 sqrt(v + eps)), e the draw's noise
    x2 = _deferred(mean[:4], var[:4], eps=0.05)
    assert "deferred" in repr(x2)
    sample = x2.plain()                                       # plain() reads the data too
    assert not x2.is_deferred
    sample.sum().backward()
    noise = (sample.detach() - mean[:4]) / (var[:4] + 0.05).sqrt()
    torch.testing.assert_close(x2.moment_mean.grad, torch.ones_like(noise))
    torch.testing.assert_close(x2.moment_var.grad, noise / (2 * (var[:4] + 0.05).sqrt()))


def test_deferred_mixed_with_a_drawn_moment_tensor_is_drawn_first():
    m, v = torch.randn(5, 3), torch.rand(5, 3)
    x, drawn = _deferred(m, v), MomentTensor.from_moments(m, v)
    out = x + drawn
    assert not x.is_deferred and has_moments(out) and not out.is_deferred
    torch.testing.assert_close(out.plain(), x.plain() + drawn.plain())
    torch.testing.assert_close(out.moment_var, 2 * v)


def test_unhandled_in_place_op_on_a_deferred_tensor_draws_it_then_applies():
    x = _deferred(torch.randn(6, 4), torch.rand(6, 4))
    x.relu_()
    assert not x.is_deferred and not has_moments(x)           # mutated: moments invalid
    assert (x.plain() >= 0).all() and (x.plain() == 0).any()


def test_deferred_batch_norm_uses_the_law_of_total_variance():
    """Training BatchNorm of N(m_i, v_i) without a sample: mu_B = mean_i m_i and
    var_B = var_i m_i + mean_i v_i (the population statistics of the random tensor: the
    batch statistics of many samples converge to them), running statistics updated as
    F.batch_norm does (momentum, n / (n - 1)); eval uses the running statistics."""
    g = torch.Generator().manual_seed(3)
    m = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64) * 2 + 1
    v = torch.rand(6, 3, 4, 4, generator=g, dtype=torch.float64) + 0.5
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -2.0, 1.5]))
        bn.bias.copy_(torch.tensor([0.1, 0.0, -1.0]))
    x = _deferred(m, v)
    y = bn.train()(x)
    assert isinstance(y, MomentTensor) and y.is_deferred
    dims = (0, 2, 3)
    mu = m.mean(dims)
    var_b = ((m - mu.view(1, -1, 1, 1)) ** 2).mean(dims) + v.mean(dims)
    k = bn.weight.detach() / (var_b + bn.eps).sqrt()
    torch.testing.assert_close(y.moment_mean, (m - mu.view(1, -1, 1, 1)) * k.view(1, -1, 1, 1)
                               + bn.bias.detach().view(1, -1, 1, 1))
    torch.testing.assert_close(y.moment_var, v * (k * k).view(1, -1, 1, 1))
    n = 6 * 4 * 4
    torch.testing.assert_close(bn.running_mean, 0.1 * mu)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * var_b * n / (n - 1))
    # the statistics of samples of x estimate exactly these
    samples = m + v.sqrt() * torch.randn(4000, *m.shape, generator=g, dtype=torch.float64)
    emp = samples.transpose(1, 2).reshape(4000, 3, -1)
    torch.testing.assert_close(emp.var(2, unbiased=False).mean(0), var_b, rtol=0.02, atol=0)
    # gradients reach the moments and the affine parameters
    (y.moment_mean * torch.randn_like(m) + y.moment_var).sum().backward()
    assert x.moment_mean.grad.abs().sum() > 0 and bn.weight.grad.abs().sum() > 0
    # eval: the running statistics' affine map, still no sample
    x = _deferred(m, v)
    y = bn.eval()(x)
    assert y.is_deferred
    k = bn.weight.detach() / (bn.running_var + bn.eps).sqrt()
    torch.testing.assert_close(y.moment_var, v * (k * k).view(1, -1, 1, 1))
