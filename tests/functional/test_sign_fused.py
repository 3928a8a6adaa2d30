"""The fused sign kernels (lr_quant.functional.sign_fused) against independent references:
torch's log_ndtr / erf / ndtr in float64, finite differences (gradcheck), and the composed
straight-through estimator they replace."""

import math

import pytest
import torch

from lr_quant.functional.sign import Z_MAX, relaxed_sign_sample, sign_log_odds_and_moments
from lr_quant.functional.sign_fused import RelaxedSign, SignStatistics, log_phi_tail


def _stats(z, with_moments):
    """The node on a margin z itself (c = z, v = 1, eps = 0)."""
    return SignStatistics.apply(z, torch.ones((), dtype=z.dtype), 0.0, with_moments, Z_MAX)


def _reference(z64):
    lo = torch.special.log_ndtr(z64) - torch.special.log_ndtr(-z64)
    mean = torch.erf(z64 / math.sqrt(2))
    # 4 Phi(-|z|) Phi(|z|) with the tail from erfc (torch's ndtr rounds the tail to 1 - P)
    tail = 0.5 * torch.erfc(z64.abs() / math.sqrt(2))
    var = 4 * tail * (1 - tail)
    return lo, mean, var


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_statistics_match_float64_references_over_the_whole_clamped_range(dtype, rtol):
    z64 = torch.linspace(-Z_MAX, Z_MAX, 40_001, dtype=torch.float64)
    lo_ref, mean_ref, var_ref = _reference(z64)
    lo, mean, var = _stats(z64.to(dtype), True)
    z_in = z64.to(dtype).double()          # compare at the rounded input
    lo_ref, mean_ref, var_ref = _reference(z_in)
    scale = lo_ref.abs().clamp_min(1.0)
    assert ((lo.double() - lo_ref).abs() / scale).max() < 4 * rtol
    assert (mean.double() - mean_ref).abs().max() < 4 * rtol
    # variance relative to its own size: the tails are 4 Phi(-|z|), down to 1e-23 in float32
    tiny = 1e-30 if dtype == torch.float32 else 1e-300
    big = var_ref > tiny
    assert ((var.double()[big] - var_ref[big]).abs() / var_ref[big]).max() < 1e-5
    assert (var >= 0).all()
    # the log-odds alone (no moments) are the same numbers
    assert torch.equal(_stats(z64.to(dtype), False)[0], lo)


def test_tail_series_and_erfc_branch_agree_at_the_cutoff():
    a = torch.tensor([9.999, 10.0, 10.001, 35.99, 36.0, 36.01], dtype=torch.float64)
    ref = torch.special.log_ndtr(-a)
    torch.testing.assert_close(log_phi_tail(a), ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(log_phi_tail(a.float()).double(), ref, rtol=2e-7, atol=0)


def test_statistics_gradients_match_finite_differences_and_analytic_forms():
    z = torch.tensor([-39.0, -12.0, -3.0, -0.4, 0.0, 1e-4, 0.7, 2.5, 9.0, 11.0, 30.0],
                     dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def combined(t):
        lo, mean, var = _stats(t, True)
        return (w[0] * lo).sum() + (w[1] * mean).sum() + (w[2] * var).sum()

    assert torch.autograd.gradcheck(combined, (z,))
    # at z = 0 exactly: dl/dz = phi(0) / (1/4) = 4 / sqrt(2 pi) (abs() has no kink here)
    (g,) = torch.autograd.grad(_stats(z, False)[0].sum(), z)
    assert g[4].item() == pytest.approx(4 / math.sqrt(2 * math.pi), rel=1e-12)
    # dl/dz -> |z| in the tails (l ~ z^2 / 2), finite at Z_MAX in float32 too
    zf = torch.tensor([-Z_MAX, Z_MAX], requires_grad=True)
    (gf,) = torch.autograd.grad(_stats(zf, False)[0].sum(), zf)
    assert torch.isfinite(gf).all() and ((gf - Z_MAX).abs() < 0.1).all()


def test_moment_outputs_unused_in_the_loss_give_no_gradient_terms():
    z = torch.linspace(-3, 3, 7, dtype=torch.float64, requires_grad=True)
    lo, mean, var = _stats(z, True)
    (g_all,) = torch.autograd.grad(lo.sum(), z)
    (g_lo,) = torch.autograd.grad(_stats(z, False)[0].sum(), z)
    torch.testing.assert_close(g_all, g_lo)


def test_relaxed_sign_is_the_composed_straight_through_estimator():
    gen = torch.Generator().manual_seed(3)
    lo = torch.randn(5000, dtype=torch.float64, generator=gen, requires_grad=True)
    logistic = torch.logit(torch.rand(5000, dtype=torch.float64, generator=gen))
    tau = 0.7
    s = RelaxedSign.apply(lo, logistic, tau)
    y = lo + logistic
    soft = 2 * torch.sigmoid(y / tau) - 1
    hard = torch.where(y >= 0, 1.0, -1.0).double()
    composed = hard + (soft - soft.detach())
    assert torch.equal(s, composed)
    w = torch.randn(5000, dtype=torch.float64, generator=gen)
    (g,) = torch.autograd.grad((w * s).sum(), lo)
    (g_ref,) = torch.autograd.grad((w * composed).sum(), lo)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-15)


def test_samples_follow_the_gaussian_sign_probability():
    """Monte Carlo: the hard samples of the fused path have mean E[s] = erf(z / sqrt 2)."""
    gen = torch.Generator().manual_seed(0)
    m = torch.tensor([-1.0, -0.2, 0.0, 0.5, 2.0]).repeat(40_000, 1)
    v = torch.full_like(m, 0.64)
    lo, mean, _ = sign_log_odds_and_moments(m, v)
    s = relaxed_sign_sample(lo, 1.0, gen)
    se = 1.0 / math.sqrt(40_000)
    assert ((s.mean(0) - mean[0]).abs() < 4 * se).all()


def test_margin_inside_the_node_matches_finite_differences_and_the_clamp():
    """c = m - t and v enter the node directly (z = c / sqrt(v + eps) is computed inside):
    gradcheck in (c, v), zero gradient where the clamp at Z_MAX is active, and a broadcast
    variance (noise mode: one sigma^2) gets its gradient summed to its shape."""
    gen = torch.Generator().manual_seed(4)
    c = (3 * torch.randn(7, 5, dtype=torch.float64, generator=gen)).requires_grad_(True)
    v = (torch.rand(7, 5, dtype=torch.float64, generator=gen) + 0.05).requires_grad_(True)
    w = torch.randn(3, 7, 5, dtype=torch.float64, generator=gen)

    def combined(c_, v_):
        lo, mean, var = SignStatistics.apply(c_, v_, 1e-3, True, Z_MAX)
        return (w[0] * lo).sum() + (w[1] * mean).sum() + (w[2] * var).sum()

    assert torch.autograd.gradcheck(combined, (c, v))
    # beyond the clamp: constant outputs, zero gradients
    big = torch.tensor([-100.0, 100.0], dtype=torch.float64, requires_grad=True)
    one = torch.ones(2, dtype=torch.float64, requires_grad=True)
    lo, mean, var = SignStatistics.apply(big, one, 0.0, True, Z_MAX)
    gc, gv = torch.autograd.grad(lo.sum() + mean.sum() + var.sum(), (big, one))
    assert (gc == 0).all() and (gv == 0).all() and mean.tolist() == [-1.0, 1.0]
    # a 0-dim variance shared by every element (noise mode, learned sigma_a)
    sigma2 = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    x = torch.randn(50, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(
        lambda s: SignStatistics.apply(x, s, 0.0, False, Z_MAX)[0], (sigma2,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exp_and_erfc_never_see_an_underflowing_argument(dtype):
    """exp / erfc take a slow path (8-40x on CPU, flushing subnormals or not) where their
    result underflows: every exp / erfc the sign nodes run, forward and backward, over
    margins out to |z| = 1e4, gets an argument whose result is a normal float (recorded at
    the aten level), and the saturated values are still exact (E[s] = +-1, Var[s] = 0)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lr_quant.functional.sign_fused import SignMoments

    tiny = torch.finfo(dtype).tiny
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__.rstrip("_")
            if name in ("exp", "erfc"):
                seen.append((name, out.detach().clone()))
            return out

    z = torch.cat([torch.linspace(-60, 60, 2001, dtype=dtype),
                   torch.tensor([-1e4, 1e4], dtype=dtype)]).requires_grad_(True)
    v = torch.full_like(z, 0.3).requires_grad_(True)
    weights = torch.randn(3, z.numel(), generator=torch.Generator().manual_seed(0),
                          dtype=dtype)
    with Record():
        lo, mean_s, var_s = SignStatistics.apply(z, v, 1e-6, True, Z_MAX)
        mean_m, var_m = SignMoments.apply(z, v, 1e-6, Z_MAX)
        loss = ((lo * weights[0] + (mean_s + mean_m) * weights[1] +
                 (var_s + var_m) * weights[2]).sum())
        grads = torch.autograd.grad(loss, (z, v))
    assert {name for name, _ in seen} == {"exp", "erfc"}
    for name, out in seen:
        assert (out.abs() >= tiny).all(), f"{name} underflowed"
    margin = (z / (v + 1e-6).sqrt()).detach()
    far = margin.abs() > (38.0 if dtype == torch.float64 else 13.1)   # Phi(-|z|) < tiny
    assert far.sum() > 500
    for mean, var in ((mean_s, var_s), (mean_m, var_m)):
        assert torch.equal(mean[far], margin[far].sign()) and (var[far] == 0).all()
    assert all(torch.isfinite(g).all() for g in grads)
