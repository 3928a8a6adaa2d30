"""Binary and ternary sign activations of Gaussian inputs: probabilities, moments, samples.

A pre-activation of an LR layer is approximately Gaussian, a ~ N(m, v) (local
reparameterization, Shayer et al. 2018). Its sign with a threshold t is a Bernoulli variable
on {-1, +1}:

    P(+1) = P(a - t >= 0) = Phi((m - t) / sqrt(v + eps))

    E[s]   = 2 P - 1                      = erf(z / sqrt(2)),   z = (m - t) / sqrt(v + eps)
    Var[s] = 1 - (2 P - 1)^2 = 4 P (1 - P) = 4 Phi(z) Phi(-z)

(Roth et al. 2019). Both tails are computed as erfc(-+z / sqrt 2) / 2 (``ndtr``
below), so no quantity is formed by subtracting two numbers close to 1 (``1 - mean^2``
cancels to 0 or to negative numbers in float32 for |z| > ~4; ``4 P (1 - P)`` with
P = ndtr(z), 1 - P = ndtr(-z) does not). The binary log-odds, moments and relaxed sample
are fused autograd nodes (:mod:`.sign_fused`: erfc and a tail series instead of
``torch.special.log_ndtr``, which the ternary log-probabilities still use).

Standardized margins z are clamped to +-Z_MAX = 40: beyond it Phi(z), E[s] and Var[s] are
already exactly 0 / 1 in float32 and float64 (Phi(-40) ~ 4e-350), and log Phi(-40) = -804.6
still makes every sample deterministic (logistic / Gumbel noise from float32 uniforms is
bounded by ~90). The clamp keeps ``log_ndtr`` and its gradient accurate: torch's
``log_ndtr`` backward is wrong beyond |z| ~ 1e3 and returned NaN for the extreme margins a
ternary activation with a small half-width t produced in training (z = (m -+ t)/s with
s -> 0).

Noise mode: where the input's variance is unknown, the input x is treated as
x + N(0, sigma_a^2), i.e. P(+1) = Phi((x - t) / sigma_a).

Sampling: a hard +-1 sample with a straight-through binary-concrete (Gumbel-sigmoid)
relaxation (Maddison et al. 2017; Jang et al. 2017). With l = log P - log(1 - P) and
L ~ Logistic(0, 1):

    forward:  s = +1 if l + L >= 0 else -1             (exact Bernoulli(P) sample)
    backward: ds/dl = d/dl [2 sigmoid((l + L) / tau) - 1]

Ternary activations with thresholds +-t (t >= 0) on {-1, 0, +1}:

    P(+1) = Phi((m - t) / s),  P(-1) = Phi(-(m + t) / s),  P(0) = Phi((m + t)/s) - Phi((m - t)/s)

with P(0) computed from whichever pair of tails avoids cancellation.

Deterministic inference sign: x >= 0 -> +1, x < 0 -> -1 (the QONNX BipolarQuant convention;
``torch.sign(0) == 0`` is wrong here). Ternary: x > t -> +1, x < -t -> -1, |x| <= t -> 0,
which is ``clip(round(x / (2t)), -1, 1)`` with rounding half to even: what Brevitas' ternary
quantizers compute and what a QONNX 2-bit narrow ``Quant`` (ROUND) of x / (2t) exports.

# References
- Shayer, Levi, Fetaya. "Learning Discrete Weights Using the Local Reparameterization
  Trick". ICLR 2018.
- Roth, Schindler, Fröning, Pernkopf. "Training Discrete-Valued Neural Networks with Sign
  Activations Using Weight Distributions". ECML-PKDD 2019.
- "Berger 2023", cited for the sign activation in the design notes: not verified here (no
  copy found); every formula above is the one of Roth et al. 2019.
- Maddison, Mnih, Teh. "The Concrete Distribution". ICLR 2017; Jang, Gu, Poole. "Categorical
  Reparameterization with Gumbel-Softmax". ICLR 2017.
- Liu et al. "ReActNet". ECCV 2020 (learnable per-channel threshold before the sign).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .._random import rand_as
from .sign_fused import RelaxedSign, SignMoments, SignStatistics

__all__ = [
    "DEFAULT_EPS",
    "Z_MAX",
    "ndtr",
    "binary_sign",
    "ste_sign",
    "sign_z",
    "sign_probability",
    "sign_log_odds",
    "sign_moments",
    "sign_log_odds_and_moments",
    "noise_sign_probability",
    "relaxed_sign_sample",
    "sample_sign",
    "sample_noise_sign",
    "ternary_sign",
    "ternary_log_probabilities",
    "ternary_probabilities",
    "ternary_moments",
    "ternary_moments_from_log_probabilities",
    "relaxed_ternary_sample",
    "sample_ternary",
]

DEFAULT_EPS = 1e-8
#: standardized margins are clamped to [-Z_MAX, Z_MAX] (see the module docstring)
Z_MAX = 40.0
Number = Union[float, int]
ThresholdLike = Union[Number, Tensor]

_SQRT1_2 = 1.0 / math.sqrt(2.0)


def _check_finite(name: str, x: Tensor) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values (nan or inf)")


def _check_nonneg(name: str, x: ThresholdLike) -> None:
    if isinstance(x, Tensor):
        if (x < 0).any():
            raise ValueError(f"{name} must be >= 0, got a tensor with negative entries")
    elif x < 0:
        raise ValueError(f"{name} must be >= 0, got {x}")


def _check_tau(tau: ThresholdLike) -> None:
    if isinstance(tau, Tensor):
        if not (tau > 0).all():
            raise ValueError("temperature tau must be > 0")
    elif not tau > 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")


def ndtr(z: Tensor) -> Tensor:
    """Phi(z) = erfc(-z / sqrt 2) / 2, accurate in both tails (``torch.special.ndtr`` rounds
    Phi(-6) to 0 in float32, Phi(-9) to 0 in float64)."""
    return 0.5 * torch.erfc(-z * _SQRT1_2)


def binary_sign(x: Tensor) -> Tensor:
    """Deterministic sign with the BipolarQuant convention: x >= 0 -> +1, x < 0 -> -1."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class _SteSign(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, clip):
        ctx.save_for_backward(x)
        ctx.clip = clip
        return binary_sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if ctx.clip is None:
            return grad, None
        return grad * (x.abs() <= ctx.clip).to(grad.dtype), None


def ste_sign(x: Tensor, clip: Optional[float] = 1.0) -> Tensor:
    """Straight-through sign (the baseline): forward ``binary_sign(x)``,
    backward ``grad * 1[|x| <= clip]`` (hard-tanh pseudo-gradient; ``clip=None``: identity).

    # References
    - Hubara et al. "Binarized Neural Networks". NeurIPS 2016.
    """
    return _SteSign.apply(x, clip)


def sign_z(mean: Tensor, var: Tensor, threshold: ThresholdLike = 0.0,
           eps: float = DEFAULT_EPS) -> Tensor:
    """Standardized margin z = (m - t) / sqrt(v + eps), clamped to [-Z_MAX, Z_MAX]."""
    _check_nonneg("eps", eps)
    if not isinstance(var, Tensor):
        var = torch.as_tensor(var, dtype=mean.dtype, device=mean.device)
    return ((mean - threshold) * torch.rsqrt(var + eps)).clamp(-Z_MAX, Z_MAX)


def sign_probability(mean: Tensor, var: Tensor, threshold: ThresholdLike = 0.0,
                     eps: float = DEFAULT_EPS) -> Tensor:
    """P(a - t >= 0) = Phi((m - t) / sqrt(v + eps)) for a ~ N(m, v)  (Roth et al. 2019)."""
    return ndtr(sign_z(mean, var, threshold, eps))


def sign_log_odds(mean: Tensor, var: Tensor, threshold: ThresholdLike = 0.0,
                  eps: float = DEFAULT_EPS) -> Tensor:
    """log P(+1) - log P(-1) = log Phi(z) - log Phi(-z), finite for any finite z."""
    return _sign_statistics(mean, var, threshold, eps, False)[0]


def sign_log_odds_and_moments(mean: Tensor, var: Tensor, threshold: ThresholdLike = 0.0,
                              eps: float = DEFAULT_EPS) -> Tuple[Tensor, Tensor, Tensor]:
    """(log-odds, E[s], Var[s]) of s = sign(a - t), a ~ N(m, v), as one autograd node
    (what training needs; the same values as sign_log_odds and sign_moments)."""
    return _sign_statistics(mean, var, threshold, eps, True)


def _sign_statistics(mean, var, threshold, eps, with_moments):
    _check_nonneg("eps", eps)
    if not isinstance(var, Tensor):
        var = torch.as_tensor(var, dtype=mean.dtype, device=mean.device)
    return SignStatistics.apply(mean - threshold, var, eps, with_moments, Z_MAX)


def sign_moments(mean: Tensor, var: Tensor, threshold: ThresholdLike = 0.0,
                 eps: float = DEFAULT_EPS) -> Tuple[Tensor, Tensor]:
    """Mean and variance of s = sign(a - t), a ~ N(m, v):

        E[s] = 2P - 1 = erf(z / sqrt 2),   Var[s] = 4 P (1 - P) = 4 Phi(z) Phi(-z),

    z = (m - t) / sqrt(v + eps). Never ``1 - E[s]^2`` (it cancels). One autograd node
    (:class:`~.sign_fused.SignMoments`): no log-odds, nothing for a sample."""
    _check_nonneg("eps", eps)
    if not isinstance(var, Tensor):
        var = torch.as_tensor(var, dtype=mean.dtype, device=mean.device)
    return SignMoments.apply(mean - threshold, var, eps, Z_MAX)


def noise_sign_probability(x: Tensor, sigma: ThresholdLike,
                           threshold: ThresholdLike = 0.0) -> Tensor:
    """Noise mode: P(+1) = Phi((x - t) / sigma_a), the input read as x + N(0, sigma_a^2)."""
    _check_noise_std(sigma)
    return ndtr((x - threshold) / sigma)


def _check_noise_std(sigma: ThresholdLike) -> None:
    if isinstance(sigma, Tensor):
        if not (sigma > 0).all():
            raise ValueError("noise std sigma_a must be > 0")
    elif not sigma > 0:
        raise ValueError(f"noise std sigma_a must be > 0, got {sigma}")


def _uniform_open(like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    u = rand_as(like, generator=generator)
    tiny = torch.finfo(like.dtype).tiny
    return u.clamp(tiny, 1.0 - torch.finfo(like.dtype).eps / 2)


def relaxed_sign_sample(log_odds: Tensor, tau: ThresholdLike = 1.0,
                        generator: Optional[torch.Generator] = None, *,
                        validate: bool = True) -> Tensor:
    """Hard +-1 sample of Bernoulli(sigmoid(log_odds)), straight-through binary concrete:

        L = log u - log(1 - u), u ~ U(0, 1)
        forward  s = +1 if log_odds + L >= 0 else -1
        backward through 2 sigmoid((log_odds + L) / tau) - 1.

    ``validate=False`` skips the tau > 0 check (a device sync for a tensor tau).
    """
    if validate:
        _check_tau(tau)
    u = _uniform_open(log_odds, generator)
    logistic = torch.log(u) - torch.log1p(-u)
    return RelaxedSign.apply(log_odds, logistic, tau)


def sample_sign(mean: Tensor, var: Tensor, threshold: ThresholdLike = 0.0,
                tau: ThresholdLike = 1.0, eps: float = DEFAULT_EPS,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """Moment mode: hard sample of sign(a - t), a ~ N(m, v), gradient by the relaxation."""
    _check_nonneg("var", var)
    return relaxed_sign_sample(sign_log_odds(mean, var, threshold, eps), tau, generator)


def sample_noise_sign(x: Tensor, sigma: ThresholdLike, threshold: ThresholdLike = 0.0,
                      tau: ThresholdLike = 1.0,
                      generator: Optional[torch.Generator] = None) -> Tensor:
    """Noise mode: hard sample of sign(x + sigma_a e - t), e ~ N(0, 1), relaxed gradient."""
    _check_noise_std(sigma)
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    log_odds = SignStatistics.apply(x - threshold, sigma * sigma, 0.0, False, Z_MAX)[0]
    return relaxed_sign_sample(log_odds, tau, generator)


# --- ternary -------------------------------------------------------------------------


def ternary_sign(x: Tensor, threshold: ThresholdLike) -> Tensor:
    """Deterministic ternary sign: x > t -> +1, x < -t -> -1, |x| <= t -> 0 (t >= 0);
    equal to ``clip(round_half_even(x / (2t)), -1, 1)`` in exact arithmetic."""
    _check_nonneg("threshold", threshold)
    ones = torch.ones_like(x)
    minus_or_zero = torch.where(x < -threshold, -ones, torch.zeros_like(x))
    return torch.where(x > threshold, ones, minus_or_zero)


def ternary_log_probabilities(mean: Tensor, var: Tensor, threshold: ThresholdLike,
                              eps: float = DEFAULT_EPS, *, validate: bool = True) -> Tensor:
    """log P over (-1, 0, +1), stacked on a new last axis, for a ~ N(m, v), thresholds +-t.
    ``validate=False`` skips the (device-syncing) t >= 0, v >= 0 checks."""
    if validate:
        _check_nonneg("threshold", threshold)
        _check_nonneg("var", var)
    s = torch.rsqrt(var + eps)
    z_hi = ((mean - threshold) * s).clamp(-Z_MAX, Z_MAX)   # P(+1) = Phi(z_hi)
    z_lo = ((mean + threshold) * s).clamp(-Z_MAX, Z_MAX)   # P(-1) = Phi(-z_lo); z_lo >= z_hi
    log_plus = torch.special.log_ndtr(z_hi)
    log_minus = torch.special.log_ndtr(-z_lo)
    # P(0) = Phi(z_lo) - Phi(z_hi) = Phi(-z_hi) - Phi(-z_lo): use the pair of smaller tails.
    p0 = torch.where(z_hi > 0,
                     ndtr(-z_hi) - ndtr(-z_lo),
                     ndtr(z_lo) - ndtr(z_hi))
    log_zero = torch.log(p0.clamp_min(torch.finfo(p0.dtype).tiny))
    return torch.stack([log_minus, log_zero, log_plus], dim=-1)


def ternary_probabilities(mean: Tensor, var: Tensor, threshold: ThresholdLike,
                          eps: float = DEFAULT_EPS) -> Tuple[Tensor, Tensor, Tensor]:
    """(P(-1), P(0), P(+1)) for a ~ N(m, v) and thresholds +-t (see module docstring)."""
    p = ternary_log_probabilities(mean, var, threshold, eps).exp()
    return p[..., 0], p[..., 1], p[..., 2]


def ternary_moments(mean: Tensor, var: Tensor, threshold: ThresholdLike,
                    eps: float = DEFAULT_EPS) -> Tuple[Tensor, Tensor]:
    """E[s] = P(+1) - P(-1); Var[s] = sum_k P_k (s_k - E[s])^2 (a sum of non-negative terms)."""
    return ternary_moments_from_log_probabilities(
        ternary_log_probabilities(mean, var, threshold, eps))


def ternary_moments_from_log_probabilities(log_probs: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean and variance of s in {-1, 0, +1} with log P stacked on the last axis."""
    p = log_probs.exp()
    p_minus, p_zero, p_plus = p[..., 0], p[..., 1], p[..., 2]
    mu = p_plus - p_minus
    out_var = p_plus * (1.0 - mu) ** 2 + p_zero * mu ** 2 + p_minus * (1.0 + mu) ** 2
    return mu, out_var


def sample_ternary(mean: Tensor, var: Tensor, threshold: ThresholdLike, tau: ThresholdLike = 1.0,
                   eps: float = DEFAULT_EPS,
                   generator: Optional[torch.Generator] = None) -> Tensor:
    """Hard sample in {-1, 0, +1}: straight-through Gumbel-softmax over the three log-probs.

    forward: argmax_k (log P_k + G_k) mapped to (-1, 0, +1); backward through
    sum_k softmax((log P + G) / tau)_k * value_k."""
    _check_tau(tau)
    return relaxed_ternary_sample(ternary_log_probabilities(mean, var, threshold, eps), tau,
                                  generator, validate=False)


def relaxed_ternary_sample(log_probs: Tensor, tau: ThresholdLike = 1.0,
                           generator: Optional[torch.Generator] = None, *,
                           validate: bool = True) -> Tensor:
    """Hard sample in {-1, 0, +1} from log P stacked on the last axis (Gumbel-max), with
    the straight-through Gumbel-softmax gradient at temperature tau (Jang et al. 2017)."""
    if validate:
        _check_tau(tau)
    logp = log_probs
    u = _uniform_open(logp, generator)
    gumbel = -torch.log(-torch.log(u))
    y = logp + gumbel
    values = torch.tensor([-1.0, 0.0, 1.0], dtype=logp.dtype, device=logp.device)
    soft = (torch.softmax(y / tau, dim=-1) * values).sum(-1)
    hard = values[y.detach().argmax(dim=-1)]
    return hard + (soft - soft.detach())
