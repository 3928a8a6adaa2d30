"""LR pre-activation moments against Monte Carlo over sampled discrete weight sets.

The analytic mean/variance of a linear map of independent weights are exact (not a CLT
approximation), so the empirical moments over S sampled weight sets must match them up to
sampling error: the mean within 5 standard errors sqrt(v / S), the variance within
6 * sqrt(2 / S) relative (the Gaussian standard error of a variance, with margin for the
mild excess kurtosis of sums of a few discrete terms).
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from lr_quant.distributions import (BinaryDistribution, CategoricalDistribution,
                                    TernaryDistribution)
from lr_quant.functional import lr_moments, lr_sample

SAMPLES = 12_000
CHUNK = 1_000
DISTS = [BinaryDistribution(), TernaryDistribution(), CategoricalDistribution((-2., -1., 0., 1., 2.))]
DIST_IDS = ["binary", "ternary", "quinary"]


def assert_moments_match(samples, mean, var):
    """samples: (S, ...) draws; mean/var: analytic (...)."""
    s = samples.shape[0]
    emp_mean = samples.mean(0)
    emp_var = samples.var(0)
    mean_err = (emp_mean - mean).abs() / (var / s).sqrt().clamp_min(1e-12)
    assert mean_err.max() < 5, f"mean off by {mean_err.max():.2f} standard errors"
    rel = ((emp_var - var).abs() / var).max()
    assert rel < 6 * (2 / s) ** 0.5, f"variance off by {rel:.3f} relative"


def sampled_conv_outputs(dist, logits, x, x_var, conv_kwargs, groups):
    """S outputs of conv2d(x_s, w_s) for S independent weight (and input) draws.

    Draws are batched: the S weight sets become S groups of one grouped convolution.
    """
    out = []
    gen = torch.Generator().manual_seed(7)
    for _ in range(SAMPLES // CHUNK):
        w = torch.stack([dist.sample(logits, gen) for _ in range(CHUNK)])  # (C, O, I/g, k, k)
        xs = x.expand(CHUNK, *x.shape[1:])
        if x_var is not None:
            xs = xs + x_var.sqrt() * torch.randn(xs.shape, generator=gen, dtype=x.dtype)
        n, c, h, wd = xs.shape
        xs = xs.reshape(1, n * c, h, wd)
        y = F.conv2d(xs, w.reshape(-1, *w.shape[2:]), groups=CHUNK * groups, **conv_kwargs)
        out.append(y.reshape(CHUNK, -1, *y.shape[2:]))
    return torch.cat(out)


@pytest.mark.parametrize("dist", DISTS, ids=DIST_IDS)
@pytest.mark.parametrize("stochastic_input", [False, True], ids=["det-input", "stoch-input"])
def test_linear_moments_monte_carlo(dist, stochastic_input):
    torch.manual_seed(1)
    out_f, in_f = 6, 9
    logits = 1.5 * torch.randn(dist.logits_shape((out_f, in_f)), dtype=torch.float64)
    x = torch.randn(1, in_f, dtype=torch.float64)
    x_var = 0.5 * torch.rand(1, in_f, dtype=torch.float64) if stochastic_input else None
    bias = torch.randn(out_f, dtype=torch.float64)
    w_mean, w_var = dist.moments(logits)
    mean, var = lr_moments(F.linear, x, w_mean, w_var, bias, x_var=x_var)

    gen = torch.Generator().manual_seed(2)
    w = torch.stack([dist.sample(logits, gen) for _ in range(SAMPLES)])  # (S, O, I)
    xs = x.expand(SAMPLES, in_f)
    if x_var is not None:
        xs = xs + x_var.sqrt() * torch.randn(xs.shape, generator=gen, dtype=x.dtype)
    samples = torch.einsum("si,soi->so", xs, w) + bias
    assert_moments_match(samples, mean[0], var[0])


@pytest.mark.parametrize("dist", DISTS, ids=DIST_IDS)
@pytest.mark.parametrize("kind", ["conv", "depthwise", "grouped-strided-dilated"])
@pytest.mark.parametrize("stochastic_input", [False, True], ids=["det-input", "stoch-input"])
def test_conv_moments_monte_carlo(dist, kind, stochastic_input):
    torch.manual_seed(3)
    cin, cout, groups, kwargs = {
        "conv": (3, 4, 1, dict(padding=1)),
        "depthwise": (4, 4, 4, dict(padding=1)),
        "grouped-strided-dilated": (4, 6, 2, dict(stride=2, padding=2, dilation=2)),
    }[kind]
    logits = 1.5 * torch.randn(dist.logits_shape((cout, cin // groups, 3, 3)), dtype=torch.float64)
    x = torch.randn(1, cin, 5, 5, dtype=torch.float64)
    x_var = 0.5 * torch.rand_like(x) if stochastic_input else None
    w_mean, w_var = dist.moments(logits)
    op = functools.partial(F.conv2d, groups=groups, **kwargs)
    mean, var = lr_moments(lambda a, w, b: op(a, w, b), x, w_mean, w_var, None, x_var=x_var)
    samples = sampled_conv_outputs(dist, logits, x, x_var, kwargs, groups)
    assert samples.shape[1:] == mean.shape[1:]
    # border outputs can have zero variance only if every tap is padding: not the case here
    assert_moments_match(samples, mean[0], var[0])


def test_sample_moments_and_eps():
    mean = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    var = torch.tensor([0.25, 4.0, 0.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    z = torch.stack([lr_sample(mean, var, eps=1e-8, generator=gen) for _ in range(40_000)])
    torch.testing.assert_close(z.mean(0), mean, atol=0.05, rtol=0)
    torch.testing.assert_close(z.var(0), var + 1e-8, atol=0.06, rtol=0.04)


def test_sample_uses_given_noise_and_gradient_is_finite_at_zero_variance():
    mean = torch.zeros(4, requires_grad=True)
    var = torch.zeros(4, requires_grad=True)
    noise = torch.tensor([1.0, -1.0, 0.5, 2.0])
    z = lr_sample(mean, var, eps=1e-4, noise=noise)
    torch.testing.assert_close(z, 1e-2 * noise)
    z.sum().backward()
    assert torch.isfinite(var.grad).all() and torch.isfinite(mean.grad).all()
    torch.testing.assert_close(var.grad, noise / (2 * 1e-2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sample_gradients_equal_the_composed_ops_and_finite_differences(dtype):
    """The sample node keeps v and e (not sqrt(v + eps)): its values and gradients are those
    of m + sqrt(v + eps) e written out, for any input dtype (float32 compute), and of finite
    differences; a broadcast v gets its gradient summed back."""
    g = torch.Generator().manual_seed(0)
    mean0 = torch.randn(5, 7, generator=g).to(dtype)
    var0 = (torch.rand(5, 7, generator=g) + 0.01).to(dtype)
    noise = torch.randn(5, 7, generator=g, dtype=torch.promote_types(dtype, torch.float32))
    weight = torch.randn(5, 7, generator=g)
    results = []
    for node in (True, False):
        mean, var = mean0.clone().requires_grad_(), var0.clone().requires_grad_()
        if node:
            z = lr_sample(mean, var, eps=1e-3, noise=noise)
        else:
            z = torch.addcmul(mean.to(noise.dtype), torch.sqrt(var.to(noise.dtype) + 1e-3),
                              noise).to(dtype)
        results.append((z,) + torch.autograd.grad((z.float() * weight).sum(), (mean, var)))
    for a, b in zip(*results):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b)   # the dtype's tolerance (one rounding apart)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(
            lambda m, v: lr_sample(m, v, eps=1e-3, noise=noise),
            (mean0.clone().requires_grad_(), var0.clone().requires_grad_()))
        v1 = torch.full((1, 7), 0.5, dtype=dtype, requires_grad=True)
        lr_sample(mean0, v1, eps=0.0, noise=noise).sum().backward()
        torch.testing.assert_close(v1.grad, (noise / (2 * 0.5 ** 0.5)).sum(0, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_is_numerically_safe(dtype):
    """Large inputs (x^2 overflows float16 beyond 256) under CPU autocast."""
    torch.manual_seed(0)
    dist = BinaryDistribution()
    logits = torch.randn(8, 32)
    x = 400.0 * torch.randn(4, 32)
    w_mean, w_var = dist.moments(logits)
    ref_mean, ref_var = lr_moments(F.linear, x.double(), w_mean.double(), w_var.double())
    with torch.autocast("cpu", dtype=dtype):
        mean, var = lr_moments(F.linear, x, w_mean, w_var)
        z = lr_sample(mean, var)
    assert torch.isfinite(var).all() and torch.isfinite(z).all() and torch.isfinite(mean).all()
    assert (var >= 0).all()
    torch.testing.assert_close(var.double(), ref_var, rtol=2e-2, atol=1.0)
    tol = 1e-2 if dtype == torch.float16 else 2e-2
    assert ((mean.double() - ref_mean).abs() <= tol * ref_mean.abs() + 0.02 * ref_var.sqrt()).all()


def test_shape_errors():
    with pytest.raises(ValueError, match="weight mean and variance shapes differ"):
        lr_moments(F.linear, torch.randn(2, 3), torch.randn(4, 3), torch.rand(4, 2))
    with pytest.raises(ValueError, match="input mean and variance shapes differ"):
        lr_moments(F.linear, torch.randn(2, 3), torch.randn(4, 3), torch.rand(4, 3),
                   x_var=torch.rand(2, 4))
    with pytest.raises(ValueError, match="noise shape"):
        lr_sample(torch.zeros(3), torch.ones(3), noise=torch.zeros(4))


def test_preactivation_snr_matches_monte_carlo_law_of_total_variance():
    """Sampled outputs z = m + sqrt(v) e have Var(z_c) = Var(m_c) + E[v_c] per channel
    (law of total variance), so Var(m_c) / (Var(z_c) - Var(m_c)) estimates the SNR."""
    from lr_quant.functional import preactivation_snr

    torch.manual_seed(0)
    x = torch.randn(64, 6, 5, 5, dtype=torch.float64)
    w_mean = torch.randn(4, 6, 3, 3, dtype=torch.float64) * 0.3
    w_var = torch.rand(4, 6, 3, 3, dtype=torch.float64) * torch.tensor([0.01, 0.1, 1.0, 3.0],
                                                                       dtype=torch.float64).view(4, 1, 1, 1)
    op = lambda inp, w, b: F.conv2d(inp, w, b, padding=1)   # noqa: E731
    mean, var = lr_moments(op, x, w_mean, w_var)
    snr = preactivation_snr(mean, var, channel_dim=1)
    draws = torch.stack([lr_sample(mean, var, eps=0.0) for _ in range(400)])   # (S, N, C, H, W)
    total = draws.transpose(0, 2).reshape(4, -1).var(dim=1)
    signal = mean.transpose(0, 1).reshape(4, -1).var(dim=1)
    torch.testing.assert_close(snr, signal / (total - signal), rtol=0.05, atol=0)
    assert snr[0] > snr[1] > snr[2] > snr[3]


def test_preactivation_snr_channel_dim_and_bad_input():
    from lr_quant.functional import preactivation_snr

    mean = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    var = torch.tensor([[0.5, 1.0], [1.5, 1.0]])
    torch.testing.assert_close(preactivation_snr(mean, var, channel_dim=-1),
                               torch.tensor([2.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="shapes differ"):
        preactivation_snr(mean, var[:, :1])
    with pytest.raises(ValueError, match="two samples"):
        preactivation_snr(mean[:1], var[:1], channel_dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_keeps_a_generator_state_not_the_noise(dtype):
    """An own draw is kept as the generator state it came from: the backward draws it again,
    so autograd saves v alone (no activation-sized noise), and values and gradients are
    exactly those of the same draw passed in as `noise`."""
    g = torch.Generator().manual_seed(0)
    mean0 = torch.randn(4, 6, 5, generator=g).to(dtype)
    var0 = (torch.rand(4, 6, 5, generator=g) + 0.01).to(dtype)
    weight = torch.randn(4, 6, 5, generator=g)
    results = []
    for own_draw in (True, False):
        mean, var = mean0.clone().requires_grad_(), var0.clone().requires_grad_()
        torch.manual_seed(3)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                      lambda t: t):
            if own_draw:
                z = lr_sample(mean, var, eps=1e-3)
            else:
                z = lr_sample(mean, var, eps=1e-3, noise=torch.randn(4, 6, 5))
        torch.manual_seed(99)   # the backward's replay must not depend on the global stream
        results.append((z,) + torch.autograd.grad((z.float() * weight).sum(), (mean, var)))
        if own_draw:
            assert len(saved) == 1 and saved[0] is var
    for a, b in zip(*results):
        assert torch.equal(a, b)
