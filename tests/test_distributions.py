"""Discrete weight distributions: moments, mode, sampling, entropy, init, bad input."""

import math

import pytest
import torch

from lr_quant.distributions import (BinaryDistribution, CategoricalDistribution,
                                    TernaryDistribution, available_distributions,
                                    get_distribution, normalize_pretrained_weight)

DISTRIBUTIONS = [
    BinaryDistribution(),
    TernaryDistribution(),
    CategoricalDistribution((-1.0, 0.0, 1.0)),
    CategoricalDistribution((-2.0, -1.0, 0.0, 1.0, 2.0)),
    CategoricalDistribution((-3.0, -1.0, 1.0, 3.0)),
]
IDS = ["binary", "ternary", "cat3", "cat5", "cat4"]


def random_logits(dist, shape=(7, 5), scale=2.0, dtype=torch.float64):
    return scale * torch.randn(dist.logits_shape(shape), dtype=dtype)


@pytest.mark.parametrize("dist", DISTRIBUTIONS, ids=IDS)
def test_probabilities_are_a_distribution(dist):
    p = dist.probabilities(random_logits(dist))
    assert p.shape == (dist.num_values, 7, 5)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(0), torch.ones(7, 5, dtype=torch.float64))


@pytest.mark.parametrize("dist", DISTRIBUTIONS, ids=IDS)
def test_moments_match_enumeration(dist):
    """mean/var against a direct sum over the value set with the probabilities."""
    logits = random_logits(dist)
    p = dist.probabilities(logits)
    mean = sum(p[k] * v for k, v in enumerate(dist.values))
    second = sum(p[k] * v * v for k, v in enumerate(dist.values))
    got_mean, got_var = dist.moments(logits)
    torch.testing.assert_close(got_mean, mean)
    torch.testing.assert_close(got_var, second - mean ** 2)  # fine in float64, mild logits
    torch.testing.assert_close(dist.mean(logits), mean)
    torch.testing.assert_close(dist.variance(logits), second - mean ** 2)


def test_binary_closed_forms():
    theta = torch.linspace(-6, 6, 101, dtype=torch.float64)
    p = torch.sigmoid(theta)
    mean, var = BinaryDistribution().moments(theta)
    torch.testing.assert_close(mean, 2 * p - 1)
    torch.testing.assert_close(var, 1 - (2 * p - 1) ** 2)
    torch.testing.assert_close(BinaryDistribution().regularizer(theta), (p * (1 - p)).sum())


@pytest.mark.parametrize("dist", DISTRIBUTIONS, ids=IDS)
def test_variance_is_positive_and_accurate_near_determinism(dist):
    """float32, logits up to +-30: var stays > 0 and matches the float64 value."""
    logits = random_logits(dist, scale=1.0, dtype=torch.float32)
    logits[..., 0] = 30.0  # nearly deterministic weights
    logits[..., 1] = -30.0
    var32 = dist.variance(logits)
    var64 = dist.variance(logits.double())
    assert (var32 >= 0).all()
    torch.testing.assert_close(var32.double(), var64, rtol=1e-4, atol=1e-30)


@pytest.mark.parametrize("dist", DISTRIBUTIONS, ids=IDS)
def test_sampling_matches_probabilities(dist):
    """Empirical frequencies of 40k draws vs p (binomial std <= 0.0025; 6 sigma bound)."""
    logits = random_logits(dist, shape=(3, 2))
    generator = torch.Generator().manual_seed(1)
    draws = torch.stack([dist.sample(logits, generator) for _ in range(40_000)])
    p = dist.probabilities(logits)
    for k, v in enumerate(dist.values):
        freq = (draws == v).double().mean(0)
        torch.testing.assert_close(freq, p[k], atol=0.015, rtol=0)
    assert set(draws.unique().tolist()) <= set(dist.values)


@pytest.mark.parametrize("dist", DISTRIBUTIONS, ids=IDS)
def test_mode_is_most_probable_value(dist):
    logits = random_logits(dist)
    p = dist.probabilities(logits)
    expected = torch.tensor(dist.values, dtype=torch.float64)[p.argmax(0)]
    torch.testing.assert_close(dist.mode(logits), expected)


def test_binary_mode_at_zero_logit_is_plus_one():
    assert BinaryDistribution().mode(torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("dist", DISTRIBUTIONS, ids=IDS)
def test_entropy(dist):
    logits = random_logits(dist)
    p = dist.probabilities(logits)
    torch.testing.assert_close(dist.entropy(logits), -(p * p.log()).sum(0))
    # one value with probability ~1: entropy ~0 (binary: theta=50; others: first logit 50)
    sharp = torch.full_like(logits, 50.0) if dist.name == "binary" else \
        torch.zeros_like(logits).index_fill_(0, torch.tensor([0]), 50.0)
    assert dist.entropy(sharp).max() < 1e-12
    # uniform categorical: log K
    if dist.name == "categorical":
        uniform = dist.entropy(torch.zeros_like(logits))
        torch.testing.assert_close(uniform, torch.full_like(uniform, math.log(dist.num_values)))


def test_regularizer_pushes_toward_determinism():
    """Gradient descent on the binary beta term moves p away from 1/2."""
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    BinaryDistribution().regularizer(theta).backward()
    assert (theta.grad * theta.detach() < 0).all()  # descent direction increases |theta|
    logits = torch.randn(2, 4, requires_grad=True)
    TernaryDistribution().regularizer(logits).backward()
    torch.testing.assert_close(logits.grad, 2 * logits.detach())


# -- initialization from a pretrained weight ----------------------------------------------

@pytest.mark.parametrize("dist", [BinaryDistribution(), TernaryDistribution()], ids=["binary", "ternary"])
def test_shayer_init_mean_tracks_weight(dist):
    torch.manual_seed(3)
    weight = 0.05 * torch.randn(64, 32, dtype=torch.float64)
    p_min, p_max = 0.05, 0.95
    logits = dist.init_logits(weight, p_min, p_max)
    w = (weight / weight.std()).clamp(-1, 1)
    mean = dist.mean(logits)
    if dist.name == "binary":
        inactive = (0.5 * (1 + w) > p_min) & (0.5 * (1 + w) < p_max)
        p = torch.sigmoid(logits)
        assert ((p >= p_min - 1e-12) & (p <= p_max + 1e-12)).all()
    else:
        p_zero = torch.sigmoid(logits[0])
        q = torch.sigmoid(logits[1])
        q_raw = 0.5 * (1 + w / (1 - (p_max - (p_max - p_min) * w.abs())))
        inactive = (q_raw > p_min) & (q_raw < p_max)
        for prob in (p_zero, q):
            assert ((prob >= p_min - 1e-12) & (prob <= p_max + 1e-12)).all()
    # the test checks a real portion of the weights (for ternary the q clip is inactive
    # only for |w| < 0.237 with the default bounds, ~19% of a Gaussian)
    assert inactive.float().mean() > 0.15
    torch.testing.assert_close(mean[inactive], w[inactive])
    # where the clip is active the mean keeps the sign of w
    assert (torch.sign(mean[~inactive]) == torch.sign(w[~inactive])).all()


@pytest.mark.parametrize("values", [(-1.0, 0.0, 1.0), (-2.0, -1.0, 0.0, 1.0, 2.0), (-3.0, -1.0, 1.0, 3.0)])
def test_categorical_init_mean_tracks_weight(values):
    dist = CategoricalDistribution(values)
    weight = torch.randn(40, 30, dtype=torch.float64)
    p_min = 0.02
    logits = dist.init_logits(weight, p_min=p_min)
    p = dist.probabilities(logits)
    w = (weight / weight.std()).clamp(values[0], values[-1])
    k = len(values)
    target = (w - k * p_min * sum(values) / k) / (1 - k * p_min)
    inactive = (target > values[0]) & (target < values[-1])
    assert inactive.float().mean() > 0.5
    torch.testing.assert_close(dist.mean(logits)[inactive], w[inactive])
    assert (p >= p_min - 1e-12).all() and (p <= 1 - (k - 1) * p_min + 1e-12).all()


def test_init_preserves_dtype_and_from_scratch_is_seeded():
    dist = TernaryDistribution()
    weight = torch.randn(5, 4, dtype=torch.float32)
    assert dist.init_logits(weight).dtype == torch.float32
    a = dist.init_logits_from_scratch((5, 4), torch.Generator().manual_seed(0))
    b = dist.init_logits_from_scratch((5, 4), torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    assert a.shape == (2, 5, 4)


# -- registry and bad input ---------------------------------------------------------------

def test_registry():
    assert {"binary", "ternary", "categorical"} <= set(available_distributions())
    assert isinstance(get_distribution("binary"), BinaryDistribution)
    cat = get_distribution({"name": "categorical", "values": [-1, 1]})
    assert cat.values == (-1.0, 1.0) and cat.precision == 1
    assert get_distribution("ternary").precision == 2
    assert get_distribution("categorical", values=range(-2, 3)).precision == 3


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match=r"unknown weight distribution 'quinary'.*binary"):
        get_distribution("quinary")
    with pytest.raises(TypeError, match="distribution must be"):
        get_distribution(3)
    with pytest.raises(TypeError, match="bad arguments for distribution 'categorical'"):
        get_distribution("categorical")


@pytest.mark.parametrize("values, message", [
    ((1.0,), "at least 2"),
    ((1.0, -1.0), "sorted"),
    ((-1.0, -1.0, 1.0), "duplicate"),
    ((-1.0, math.nan), "finite"),
    (("a", "b"), "sequence of numbers"),
])
def test_bad_value_sets(values, message):
    with pytest.raises(ValueError, match=message):
        CategoricalDistribution(values)


def test_binary_and_ternary_refuse_other_values():
    with pytest.raises(ValueError, match="use 'categorical'"):
        BinaryDistribution((-2.0, 2.0))
    with pytest.raises(ValueError, match="use 'categorical'"):
        TernaryDistribution((-1.0, 0.5, 1.0))


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([1.0, float("nan"), 2.0]), "1 non-finite"),
    (torch.tensor([1.0, float("inf"), 2.0, -float("inf")]), "2 non-finite"),
    (torch.ones(4), "constant"),
    (torch.ones(1), "at least 2"),
    (torch.arange(4), "floating point"),
])
def test_bad_pretrained_weights(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        TernaryDistribution().init_logits(bad)


@pytest.mark.parametrize("p_min, p_max", [(0.0, 0.9), (0.6, 0.4), (0.1, 1.0)])
def test_bad_probability_bounds(p_min, p_max):
    with pytest.raises(ValueError, match="p_min"):
        BinaryDistribution().init_logits(torch.randn(5), p_min, p_max)


def test_categorical_p_min_too_large():
    with pytest.raises(ValueError, match="too large for 5 values"):
        CategoricalDistribution(range(-2, 3)).init_logits(torch.randn(5), p_min=0.2)


def test_check_logits_shape():
    with pytest.raises(ValueError, match=r"must have shape \(2, 3, 4\)"):
        TernaryDistribution().check_logits(torch.zeros(3, 4), (3, 4))


def test_binary_scaled_moments_save_only_their_outputs_and_survive_a_zero_scale():
    """The binary node keeps its outputs (which the convolution after it keeps anyway) and
    the per-channel scale, nothing weight-sized of its own (no logits, no p / q); a scale of
    exactly 0 still gets d/ds = sum(g_m mu) (autograd through tanh(theta/2) s) and the
    logits a gradient of ~0 (that of s = 1e-30), no NaN."""
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(4, 6, generator=g, dtype=torch.float64)).requires_grad_(True)
    scale = torch.tensor([[0.0], [0.7], [-1.3], [0.0]], dtype=torch.float64,
                         requires_grad=True)
    g_mean, g_var = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mean, var = BinaryDistribution().scaled_moments(logits, scale)
    weight_sized = {t.untyped_storage().data_ptr() for t in saved if t.shape == logits.shape}
    assert weight_sized == {mean.untyped_storage().data_ptr(), var.untyped_storage().data_ptr()}
    grads = torch.autograd.grad((mean * g_mean + var * g_var).sum(), (logits, scale))
    ref_mean, ref_var = torch.tanh(logits / 2) * scale, torch.cosh(logits / 2) ** -2 * scale ** 2
    ref_grads = torch.autograd.grad((ref_mean * g_mean + ref_var * g_var).sum(), (logits, scale))
    torch.testing.assert_close((mean, var), (ref_mean, ref_var), rtol=1e-7, atol=1e-29)
    torch.testing.assert_close(grads, ref_grads)
    assert grads[0][scale.detach().reshape(-1) == 0].abs().max() < 1e-29
    assert grads[1][0].abs() > 0.1


def test_normalize_pretrained_weight():
    w = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])
    got = normalize_pretrained_weight(w)
    torch.testing.assert_close(got, (w.double() / w.double().std()).clamp(-1, 1))


def test_binary_moments_gradient_matches_autograd_of_the_definition():
    """The fused backward of the binary moments vs autograd through the sigmoids."""
    theta = torch.linspace(-12, 12, 61, dtype=torch.float64, requires_grad=True)
    g_mean, g_var = torch.randn(61, dtype=torch.float64), torch.randn(61, dtype=torch.float64)
    mean, var = BinaryDistribution().moments(theta)
    (mean * g_mean + var * g_var).sum().backward()
    fused = theta.grad.clone()
    theta.grad = None
    p = torch.sigmoid(theta)
    ((2 * p - 1) * g_mean + 4 * p * (1 - p) * g_var).sum().backward()
    torch.testing.assert_close(fused, theta.grad)
    assert torch.autograd.gradcheck(lambda t: BinaryDistribution().moments(t),
                                    (torch.randn(5, dtype=torch.float64, requires_grad=True),))
    # extreme logits: finite, var >= 0
    mean, var = BinaryDistribution().moments(torch.tensor([-400.0, 400.0]))
    assert torch.equal(mean, torch.tensor([-1.0, 1.0])) and (var >= 0).all()


def test_ternary_fused_moments_match_the_generic_sum_and_autograd():
    """Shayer's closed form + hand backward vs sum_k p_k (v_k - mu)^2 through autograd."""
    dist = TernaryDistribution()
    logits = (3 * torch.randn(2, 40, dtype=torch.float64)).requires_grad_(True)
    g_mean, g_var = torch.randn(40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    mean, var = dist.moments(logits)
    (mean * g_mean + var * g_var).sum().backward()
    fused = logits.grad.clone()
    logits.grad = None
    from lr_quant.distributions import WeightDistribution
    ref_mean, ref_var = WeightDistribution.moments(dist, logits)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)
    (ref_mean * g_mean + ref_var * g_var).sum().backward()
    torch.testing.assert_close(fused, logits.grad)
    assert torch.autograd.gradcheck(lambda t: dist.moments(t),
                                    (torch.randn(2, 4, dtype=torch.float64, requires_grad=True),))


@pytest.mark.parametrize("dist", [BinaryDistribution(), TernaryDistribution(),
                                  CategoricalDistribution((-2, -1, 0, 1, 2))],
                         ids=["binary", "ternary", "quinary"])
def test_scaled_moments_equal_the_composition_and_pass_gradcheck(dist):
    """scaled_moments(logits, s) = (mu s, var s^2): binary and ternary fuse it in one
    autograd Function (only the logits and s saved); values and gradients (logits and a
    per-channel s) equal autograd through the plain composition, and finite differences."""
    from lr_quant.distributions import WeightDistribution

    torch.manual_seed(0)
    weight_shape = (4, 3, 2)
    logits = (2 * torch.randn(dist.logits_shape(weight_shape), dtype=torch.float64)
              ).requires_grad_(True)
    scale = (torch.rand(4, 1, 1, dtype=torch.float64) + 0.5).requires_grad_(True)
    g_mean, g_var = torch.randn(weight_shape, dtype=torch.float64), torch.randn(
        weight_shape, dtype=torch.float64)
    mean, var = dist.scaled_moments(logits, scale)
    grads = torch.autograd.grad((mean * g_mean + var * g_var).sum(), (logits, scale))
    ref_mean, ref_var = WeightDistribution.moments(dist, logits)
    ref_mean, ref_var = ref_mean * scale, ref_var * scale ** 2
    ref_grads = torch.autograd.grad((ref_mean * g_mean + ref_var * g_var).sum(), (logits, scale))
    torch.testing.assert_close((mean, var), (ref_mean, ref_var))
    torch.testing.assert_close(grads, ref_grads)
    small = logits.detach()[..., :1, :1].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda l, s: dist.scaled_moments(l, s), (small, scale))
    # without a scale it is the plain moments
    torch.testing.assert_close(dist.scaled_moments(logits, None), dist.moments(logits))


@pytest.mark.parametrize("dist", DISTRIBUTIONS, ids=IDS)
@pytest.mark.parametrize("gain", [1.0, 2.5, 40.0])
def test_sharpen_is_the_tempered_distribution(dist, gain):
    """sharpen(logits, g) has probabilities p_k^g / sum_j p_j^g (oracle: the power of the
    enumerated probabilities), the same mode and no more entropy (dH/dg = -g Var(log p)
    under the tempered distribution; the variance can grow when two values tie)."""
    torch.manual_seed(3)
    logits = random_logits(dist, shape=(40,))
    p = dist.probabilities(logits)
    expected = p.pow(gain) / p.pow(gain).sum(0, keepdim=True)
    sharpened = dist.sharpen(logits, gain)
    assert sharpened.shape == logits.shape
    torch.testing.assert_close(dist.probabilities(sharpened), expected)
    assert torch.equal(dist.mode(sharpened), dist.mode(logits))
    assert (dist.entropy(sharpened) <= dist.entropy(logits) + 1e-12).all()


@pytest.mark.parametrize("dist", DISTRIBUTIONS, ids=IDS)
def test_log_probabilities_round_trip(dist):
    logits = random_logits(dist)
    log_p = dist.log_probabilities(logits)
    torch.testing.assert_close(log_p.exp(), dist.probabilities(logits))
    back = dist.logits_from_log_probabilities(log_p + 0.7)   # unnormalized is fine
    torch.testing.assert_close(dist.probabilities(back), dist.probabilities(logits))


def test_sharpen_rejects_non_positive_gain():
    with pytest.raises(ValueError, match="gain must be > 0"):
        BinaryDistribution().sharpen(torch.zeros(3), 0.0)


@pytest.mark.parametrize("scale_shape", [(), (1, 1, 1), (4, 1, 1), (1, 3, 1)],
                         ids=["scalar", "per-tensor", "per-channel", "other-dim"])
def test_binary_scaled_moments_every_scale_layout_and_float32_accuracy(scale_shape):
    """The binary node's scale gradient (a dot product per tensor / per leading channel, a
    sum otherwise) equals autograd through mu s, var s^2 for every scale layout; in float32
    its values match float64 tanh(theta/2) and sech^2(theta/2) to a few units of rounding,
    var relatively so out to |theta| = 80 (no 1 - p^2 cancellation)."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(4, 3, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    scale = (torch.rand(scale_shape, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    g_mean, g_var = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    dist = BinaryDistribution()
    mean, var = dist.scaled_moments(logits, scale)
    grads = torch.autograd.grad((mean * g_mean + var * g_var).sum(), (logits, scale))
    ref_mean = torch.tanh(logits / 2) * scale
    ref_var = torch.cosh(logits / 2) ** -2 * scale ** 2
    ref_grads = torch.autograd.grad((ref_mean * g_mean + ref_var * g_var).sum(), (logits, scale))
    torch.testing.assert_close((mean, var), (ref_mean, ref_var))
    torch.testing.assert_close(grads, ref_grads)
    theta = torch.linspace(-80, 80, 3201).double()     # float32 values, exact in float64
    mean32, var32 = dist.moments(theta.float())
    exact_var = torch.cosh(theta / 2) ** -2
    assert (var32 > 0).all()
    torch.testing.assert_close(var32.double(), exact_var, rtol=4e-7, atol=0)
    torch.testing.assert_close(mean32.double(), torch.tanh(theta / 2), rtol=0, atol=2e-7)
