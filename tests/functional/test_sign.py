"""Tests of lr_quant.functional.sign: probabilities, moments, samples, gradients, errors."""

import math

import pytest
import torch

from lr_quant.functional.sign import (
    binary_sign,
    noise_sign_probability,
    relaxed_sign_sample,
    relaxed_ternary_sample,
    sample_noise_sign,
    sample_sign,
    sample_ternary,
    sign_log_odds,
    sign_log_odds_and_moments,
    sign_moments,
    sign_probability,
    ste_sign,
    ternary_log_probabilities,
    ternary_moments,
    ternary_moments_from_log_probabilities,
    ternary_probabilities,
    ternary_sign,
)

N_MC = 200_000


def _binomial_tol(p, n=N_MC, k=5.0):
    # The empirical frequency of n Bernoulli(p) draws has std sqrt(p(1-p)/n) <= 0.5/sqrt(n).
    # 5 standard deviations (two-sided tail ~6e-7 per comparison) keeps a seeded test stable
    # and still catches a wrong formula (errors here are O(0.01 - 0.3)).
    return k * torch.sqrt(p * (1 - p) / n).clamp_min(0.5 / n)


CASES = [(0.3, 0.5, 0.0), (-1.0, 2.0, 0.5), (2.0, 0.1, 1.8), (0.0, 1.0, -0.7), (3.0, 0.5, 0.0)]


def test_binary_sign_zero_is_plus_one():
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, -1e-30, 3.0])
    assert binary_sign(x).tolist() == [-1, 1, 1, 1, -1, 1]
    assert ste_sign(torch.zeros(3)).tolist() == [1, 1, 1]


@pytest.mark.parametrize("m,v,t", CASES)
def test_sample_sign_frequency_matches_phi(m, v, t):
    g = torch.Generator().manual_seed(0)
    mean = torch.full((N_MC,), m)
    var = torch.full((N_MC,), v)
    s = sample_sign(mean, var, threshold=t, tau=0.5, generator=g)
    assert set(s.unique().tolist()) <= {-1.0, 1.0}
    freq = (s > 0).double().mean()
    p = torch.tensor(0.5 * (1 + math.erf((m - t) / math.sqrt(2 * v))), dtype=torch.float64)
    assert abs(freq - p) < _binomial_tol(p)
    # the hard sample is an exact Bernoulli draw: also matches a direct Gaussian draw
    a = m + math.sqrt(v) * torch.randn(N_MC, generator=g, dtype=torch.float64)
    assert abs(freq - (a >= t).double().mean()) < 2 * _binomial_tol(p)


@pytest.mark.parametrize("m,v,t", CASES)
def test_sign_moments_match_monte_carlo(m, v, t):
    g = torch.Generator().manual_seed(1)
    mean, var = torch.tensor(m), torch.tensor(v)
    mu, sv = sign_moments(mean, var, t)
    a = m + math.sqrt(v) * torch.randn(N_MC, generator=g, dtype=torch.float64)
    s = binary_sign(a - t)
    # mean of +-1 draws: std <= 1/sqrt(n); variance estimate: std <= ~2/sqrt(n)
    assert abs(mu - s.mean()) < 5 / math.sqrt(N_MC)
    assert abs(sv - s.var()) < 10 / math.sqrt(N_MC)
    p = sign_probability(mean, var, t)
    assert torch.allclose(mu, 2 * p - 1, atol=1e-6)
    assert torch.allclose(sv, 4 * p * (1 - p), atol=1e-6)


def test_sign_moments_are_stable_in_the_tails():
    m = torch.tensor([6.0, 9.0, 13.0, -13.0])
    v = torch.ones(4)
    mu, sv = sign_moments(m, v)
    assert (sv > 0).all()   # 1 - mu^2 is exactly 0 in float32 here
    ref = 2 * torch.erfc(m.double().abs() / math.sqrt(2))   # 4 Phi(z) Phi(-z), |z| >> 1
    assert torch.allclose(sv.double(), ref, rtol=1e-4)
    mu, sv = sign_moments(torch.tensor([40.0, -1e6]), torch.ones(2))
    assert torch.isfinite(sv).all() and (sv >= 0).all() and mu.abs().eq(1).all()
    lo = sign_log_odds(torch.tensor([-100.0, 100.0]), torch.ones(2))
    # saturated at |z| = Z_MAX = 40: log Phi(40) - log Phi(-40) = 804.6 (deterministic samples)
    assert torch.isfinite(lo).all() and lo[0] == -lo[1] and 804 < lo[1] < 805


def test_sign_moment_gradients_match_analytic_and_finite_differences():
    m = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([0.5, 2.0, 0.3], dtype=torch.float64, requires_grad=True)
    t = 0.2
    mu, sv = sign_moments(m, v, t, eps=0.0)
    gm, gv = torch.autograd.grad(mu.sum(), (m, v))
    # d/dm erf(z/sqrt2) = 2 phi(z) / sqrt(v);  d/dv = -phi(z) (m - t) / v^{3/2}
    z = (m - t) / v.sqrt()
    phi = torch.exp(-0.5 * z ** 2) / math.sqrt(2 * math.pi)
    assert torch.allclose(gm, 2 * phi / v.sqrt())
    assert torch.allclose(gv, -phi * (m - t) / v ** 1.5)
    assert torch.autograd.gradcheck(lambda a, b: sign_moments(a, b, t, eps=0.0), (m, v))
    assert torch.autograd.gradcheck(lambda a, b: sign_log_odds(a, b, t), (m, v))


def test_relaxed_sample_gradient_is_finite_and_has_the_right_sign():
    g = torch.Generator().manual_seed(2)
    m = torch.zeros(10_000, requires_grad=True)
    v = torch.ones(10_000, requires_grad=True)
    s = sample_sign(m, v, threshold=0.0, tau=1.0, generator=g)
    gm, gv = torch.autograd.grad(s.sum(), (m, v))
    assert torch.isfinite(gm).all() and (gm > 0).all()   # more mean -> more +1
    assert torch.isfinite(gv).all()
    # expected pseudo-gradient is close to the derivative of E[s] = erf(m / sqrt(2v))
    assert abs(gm.mean().item() - 2 / math.sqrt(2 * math.pi)) < 0.35
    # noise mode, learned sigma: gradient w.r.t. x positive, w.r.t. sigma finite
    x = torch.linspace(-2, 2, 101, requires_grad=True)
    sigma = torch.tensor(0.7, requires_grad=True)
    s = sample_noise_sign(x, sigma, threshold=0.1, tau=0.5, generator=g)
    gx, gs = torch.autograd.grad(s.sum(), (x, sigma))
    assert (gx >= 0).all() and torch.isfinite(gs)


def test_noise_mode_frequency():
    g = torch.Generator().manual_seed(3)
    x = torch.full((N_MC,), 0.4)
    s = sample_noise_sign(x, 0.8, threshold=0.1, generator=g)
    p = noise_sign_probability(torch.tensor(0.4, dtype=torch.float64), 0.8, 0.1)
    assert abs((s > 0).double().mean() - p) < _binomial_tol(p)


@pytest.mark.parametrize("m,v,t", [(0.0, 1.0, 0.5), (1.0, 0.3, 0.4), (-0.5, 2.0, 1.0),
                                   (8.0, 1.0, 0.5)])
def test_ternary_probabilities_and_moments_match_monte_carlo(m, v, t):
    g = torch.Generator().manual_seed(4)
    mean, var = torch.tensor(m, dtype=torch.float64), torch.tensor(v, dtype=torch.float64)
    pm, p0, pp = ternary_probabilities(mean, var, t, eps=0.0)
    assert torch.allclose(pm + p0 + pp, torch.tensor(1.0, dtype=torch.float64))
    a = m + math.sqrt(v) * torch.randn(N_MC, generator=g, dtype=torch.float64)
    det = ternary_sign(a, t)
    for val, p in ((-1, pm), (0, p0), (1, pp)):
        assert abs((det == val).double().mean() - p) < _binomial_tol(p)
    mu, sv = ternary_moments(mean, var, t, eps=0.0)
    assert abs(mu - det.mean()) < 5 / math.sqrt(N_MC)
    assert abs(sv - det.var()) < 10 / math.sqrt(N_MC)
    s = sample_ternary(torch.full((N_MC,), m), torch.full((N_MC,), v), t, tau=0.5, generator=g)
    for val, p in ((-1, pm), (0, p0), (1, pp)):
        assert abs((s == val).double().mean() - p) < _binomial_tol(p)


def test_ternary_sign_is_round_half_even_of_x_over_2t():
    """x > t -> +1, x < -t -> -1, |x| <= t -> 0: the same as clip(round(x / 2t), -1, 1) with
    torch's (and numpy's, QONNX's) round half to even, also exactly on the thresholds."""
    t = 0.25   # x / (2t) = 2x: exact in float, so the ties x = +-t are real ties
    x = torch.tensor([-1.0, -0.75, -0.25 - 1e-6, -0.25, -0.1, 0.0, 0.25, 0.25 + 1e-6, 0.75, 1.0])
    assert ternary_sign(x, t).tolist() == [-1, -1, -1, 0, 0, 0, 0, 1, 1, 1]
    g = torch.Generator().manual_seed(0)
    r = torch.randn(10_000, generator=g) * 0.6
    r = torch.cat([r, torch.tensor([-0.75, -0.25, 0.25, 0.75])])   # 2x = +-0.5, +-1.5: ties
    assert torch.equal(ternary_sign(r, t), torch.clamp(torch.round(r / (2 * t)), -1, 1))


def test_ternary_moments_from_log_probabilities_match_the_distribution():
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.0, 0.0, 1.0], [0.7, 0.1, 0.2]], dtype=torch.float64)
    mu, var = ternary_moments_from_log_probabilities(probs.log())
    values = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    ref_mu = (probs * values).sum(-1)
    ref_var = (probs * (values - ref_mu[:, None]) ** 2).sum(-1)
    torch.testing.assert_close(mu, ref_mu)
    torch.testing.assert_close(var, ref_var)


def test_relaxed_ternary_sample_frequencies_and_soft_gradient():
    """Gumbel-max gives exact categorical frequencies; the straight-through gradient is the
    Gumbel-softmax one: d/d logp_k of sum_j softmax((logp + G)/tau)_j v_j (checked against
    autograd of that soft expression with the same Gumbel noise)."""
    probs = torch.tensor([0.15, 0.25, 0.6], dtype=torch.float64)
    logp = probs.log().repeat(N_MC, 1)
    s = relaxed_ternary_sample(logp, tau=0.7, generator=torch.Generator().manual_seed(6))
    for k, val in enumerate((-1.0, 0.0, 1.0)):
        assert abs((s == val).double().mean() - probs[k]) < _binomial_tol(probs[k])
    logp = torch.log(torch.tensor([[0.3, 0.3, 0.4]], requires_grad=False)).requires_grad_()
    y = relaxed_ternary_sample(logp, tau=0.5, generator=torch.Generator().manual_seed(1))
    (g,) = torch.autograd.grad(y.sum(), (logp,))
    gen = torch.Generator().manual_seed(1)
    u = torch.rand(logp.shape, generator=gen).clamp(torch.finfo(torch.float32).tiny,
                                                    1 - torch.finfo(torch.float32).eps / 2)
    lp = logp.detach().clone().requires_grad_()
    soft = (torch.softmax((lp - torch.log(-torch.log(u))) / 0.5, -1)
            * torch.tensor([-1.0, 0.0, 1.0])).sum()
    (g_ref,) = torch.autograd.grad(soft, (lp,))
    torch.testing.assert_close(g, g_ref)
    with pytest.raises(ValueError, match="tau"):
        relaxed_ternary_sample(logp.detach(), tau=0.0)


def test_ternary_log_probabilities_validate_flag():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="var"):
        ternary_log_probabilities(x, -torch.ones(3), 0.5)
    # validate=False skips the (device-syncing) checks for callers whose inputs are valid
    lp = ternary_log_probabilities(x, torch.ones(3), 0.5, validate=False)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3))


def test_ternary_sample_gradient():
    g = torch.Generator().manual_seed(5)
    m = torch.zeros(5000, requires_grad=True)
    s = sample_ternary(m, torch.ones(5000), 0.5, tau=1.0, generator=g)
    (gm,) = torch.autograd.grad(s.sum(), (m,))
    assert torch.isfinite(gm).all() and gm.mean() > 0


def test_bad_inputs_raise():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="tau"):
        relaxed_sign_sample(x, tau=0.0)
    with pytest.raises(ValueError, match="sigma"):
        sample_noise_sign(x, -1.0)
    with pytest.raises(ValueError, match="sigma"):
        noise_sign_probability(x, torch.tensor([0.5, 0.0, 1.0]))
    with pytest.raises(ValueError, match="var"):
        sample_sign(x, -torch.ones(3))
    with pytest.raises(ValueError, match="threshold"):
        ternary_probabilities(x, torch.ones(3), -0.5)


def test_extreme_margins_give_finite_exact_saturated_values_and_zero_gradients():
    """|z| up to 1e30 (a variance -> 0, a tiny ternary half-width): probabilities, moments
    and log-probabilities saturate exactly as the closed forms do at |z| = Z_MAX, samples are
    deterministic, and every gradient is finite (torch's log_ndtr backward alone returns
    wrong values beyond |z| ~ 1e3)."""
    from lr_quant.functional.sign import Z_MAX

    m = torch.tensor([-1e30, -1e5, -60.0, 60.0, 1e5, 1e30], requires_grad=True)
    v = torch.full((6,), 1e-6, requires_grad=True)
    mean, var = sign_moments(m, v, 0.0, eps=0.0)
    assert mean.tolist() == [-1, -1, -1, 1, 1, 1] and (var == 0).all()
    lo = sign_log_odds(m, v, 0.0, eps=0.0)
    assert torch.isfinite(lo).all() and (lo.sign() == torch.tensor([-1., -1, -1, 1, 1, 1])).all()
    s = sample_sign(m.repeat(1000, 1), v.repeat(1000, 1), tau=0.5,
                    generator=torch.Generator().manual_seed(0))
    assert (s == torch.tensor([-1., -1, -1, 1, 1, 1])).all()
    lp = ternary_log_probabilities(m, v, 0.5, eps=0.0)
    assert torch.isfinite(lp).all()
    assert (lp.argmax(-1) == torch.tensor([0, 0, 0, 2, 2, 2])).all()
    loss = lo.sum() + mean.sum() + var.sum() + lp.sum()
    gm, gv = torch.autograd.grad(loss, (m, v))
    assert torch.isfinite(gm).all() and torch.isfinite(gv).all()
    # at moderate margins the clamp changes nothing
    z = torch.linspace(-Z_MAX, Z_MAX, 101, dtype=torch.float64)
    torch.testing.assert_close(sign_log_odds(z, torch.ones_like(z), 0.0, 0.0),
                               torch.special.log_ndtr(z) - torch.special.log_ndtr(-z))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moments_node_equals_the_statistics_node_in_values_and_gradients(dtype):
    """sign_moments (one node, no log-odds) = the moments of sign_log_odds_and_moments, and
    its gradients too, from the body to the clamped tails (|z| = 0 .. 1e4)."""
    g = torch.Generator().manual_seed(0)
    m0 = torch.cat([torch.randn(200, generator=g, dtype=dtype) * 3,
                    torch.tensor([0.0, 9.5, -12.0, 15.0, 39.0, -41.0, 1e4], dtype=dtype)])
    v0 = torch.rand(m0.shape, generator=g, dtype=dtype) + 0.05
    weights = torch.randn(2, m0.numel(), generator=g, dtype=dtype)
    _assert_same_moments_and_gradients(lambda m, v: sign_log_odds_and_moments(m, v, 0.1)[1:],
                                       lambda m, v: sign_moments(m, v, 0.1), m0, v0, weights)


def _assert_same_moments_and_gradients(reference, tested, m0, v0, weights):
    """(E[s], Var[s]) and their gradients (a random linear loss) agree."""
    results = []
    for fn in (reference, tested):
        m, v = m0.clone().requires_grad_(), v0.clone().requires_grad_()
        mean, var = fn(m, v)
        grads = torch.autograd.grad((mean * weights[0] + var * weights[1]).sum(), (m, v))
        results.append((mean, var) + grads)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moments_node_clamps_like_the_statistics_node_below_the_clamp_free_bound(dtype):
    """A z_max where the clamp matters (3): sign_fused.SignMoments takes its clamped branch
    and still equals SignStatistics' moments (saturated beyond |z| = 3, zero gradient
    there); at the package's Z_MAX both branches agree everywhere."""
    from lr_quant.functional.sign import Z_MAX
    from lr_quant.functional.sign_fused import SignMoments, SignStatistics

    g = torch.Generator().manual_seed(1)
    c0 = torch.randn(300, generator=g, dtype=dtype) * 4
    v0 = torch.rand(c0.shape, generator=g, dtype=dtype) + 0.05
    weights = torch.randn(2, c0.numel(), generator=g, dtype=dtype)
    for z_max, reference_z_max in ((3.0, 3.0), (Z_MAX, 38.9)):
        _assert_same_moments_and_gradients(
            lambda c, v: SignStatistics.apply(c, v, 1e-6, True, reference_z_max)[1:],
            lambda c, v: SignMoments.apply(c, v, 1e-6, z_max), c0, v0, weights)
    z = c0 / (v0 + 1e-6).sqrt()
    assert (z.abs() > 3).sum() > 50     # the clamp is exercised
