"""The binary sign activation's hot path as two autograd nodes with hand-derived backward
passes (fewer elementwise passes and saved tensors than the composed ops; no
``torch.special.log_ndtr``, a scalar loop on CPU that cost ~10x an erfc).

For the standardized margin z = clamp((m - t) / sqrt(v + eps)) (computed inside the node),
with T = log Phi(-|z|) and B = log Phi(|z|):

    log-odds  l = log Phi(z) - log Phi(-z) = sign(z) (B - T)
    mean      E[s] = erf(z / sqrt 2)
    variance  Var[s] = 4 Phi(z) Phi(-z) = 4 e^T (1 - e^T)        (no cancellation)
    backward  dl/dz = phi(z) / (Phi(z) Phi(-z)) = exp(-z^2/2 - log(2 pi)/2 - T - B)
              dE/dz = 2 phi(z),   dVar/dz = -4 phi(z) E[s]

T comes from erfc below a cutoff and from the Mills-ratio series above it (Abramowitz &
Stegun 26.2.12), so it stays finite and accurate for every |z| <= Z_MAX = 40.

Where only the moments are read (an LR layer's input quantizer in training: the layer
propagates (E[s], Var[s]), never the sample), ``SignMoments`` computes just those two with
Phi(-|z|) = erfc(|z| / sqrt 2) / 2: no log-odds, no sample.

The relaxed sample (straight-through binary concrete, Maddison et al. 2017): with y = l + L,
L ~ Logistic(0, 1), the forward is s = +1 if y >= 0 else -1 and the backward
ds/dl = (2 / tau) sigmoid(y / tau) (1 - sigmoid(y / tau)).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["SignStatistics", "SignMoments", "RelaxedSign", "log_phi_tail"]

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_LOG_2 = math.log(2.0)
# log(2 / sqrt(pi)): 2 phi(z) r = exp(-h^2 + this) r_h for h = z / sqrt 2, r_h = r / sqrt 2
_LOG_2_OVER_SQRT_PI = math.log(2.0 / math.sqrt(math.pi))
# |z| beyond which log Phi(-|z|) comes from the series: erfc stays a normal number below it
# (float32: Phi(-10) = 7.6e-24), and the series' first omitted term, 945 / |z|^10, is below
# the dtype's resolution above it (float32: 1e-7 at 10; float64: 3e-13 at 36).
_TAIL_CUTOFF = {torch.float64: 36.0}
_DEFAULT_TAIL_CUTOFF = 10.0
# beyond |z| = 39, phi(z) is below 1e-330 and E[s], Var[s] are +-1, 0 exactly: clamping to
# a z_max above it changes no value by more than the floors below
_CLAMP_FREE_Z_MAX = 39.0
# exp and erfc run 8-40x slower (CPU; flushing subnormals or not) on arguments whose result
# underflows to a subnormal or to zero, so their arguments stay where the result is the
# dtype's smallest normal or more: exp(-87) = 1.6e-38 and erfc(9.194) = 1.18e-38 in float32,
# exp(-708) and erfc(26.543) in float64. Values (Phi tails) below that are then set to exactly
# 0; slopes (gradient factors) are left at that floor.
_EXP_ARG_MIN = {torch.float32: -87.0, torch.float64: -708.0}
_ERFC_ARG_MAX = {torch.float32: 9.194, torch.float64: 26.543}
# the results there, below which values are set to 0 (plain floats: nothing to trace)
_EXP_AT_MIN = {t: float(torch.tensor(x, dtype=t).exp()) for t, x in _EXP_ARG_MIN.items()}
_ERFC_AT_MAX = {t: float(torch.tensor(x, dtype=t).erfc()) for t, x in _ERFC_ARG_MAX.items()}


def _exp_floored(x: Tensor) -> Tensor:
    """exp(x) in place, x raised to the smallest argument with a normal result first."""
    return x.clamp_min_(_EXP_ARG_MIN[x.dtype]).exp_()


def log_phi_tail(a: Tensor) -> Tensor:
    """log Phi(-a) for a >= 0 (vectorized ops only)."""
    cutoff = _TAIL_CUTOFF.get(a.dtype, _DEFAULT_TAIL_CUTOFF)
    near = torch.log(0.5 * torch.erfc(a.clamp(max=cutoff) * _SQRT1_2))
    far_a = a.clamp(min=cutoff)
    r = torch.reciprocal(far_a * far_a)
    series = torch.log1p(r * (-1.0 + r * (3.0 + r * (-15.0 + 105.0 * r))))
    far = series - 0.5 * far_a * far_a - torch.log(far_a) - _HALF_LOG_2PI
    return torch.where(a <= cutoff, near, far)


def _margin(centered: Tensor, var: Tensor, eps: float, z_max: float):
    """(c, r, z, |z| clamped to z_max, [|z| <= z_max]) in float32 (float64 stays float64),
    r = 1 / sqrt(v + eps), z = c r."""
    c = centered if centered.dtype == torch.float64 else centered.float()
    r = torch.rsqrt(var.to(c.dtype) + eps)
    z_raw = c * r
    magnitude = z_raw.abs()
    return c, r, z_raw, magnitude.clamp(max=z_max), (magnitude <= z_max).to(c.dtype)


def _moments_backward(grad_mean, grad_var, mean, slope_moments):
    """dc of (E[s], Var[s]): (g_mean - 2 g_var E[s]) 2 k_m (`slope_moments` = 2 k_m); None
    when neither has a gradient."""
    if grad_var is None:
        return None if grad_mean is None else grad_mean * slope_moments
    if grad_mean is None:
        return (grad_var * mean).mul_(-2.0 * slope_moments)
    return torch.addcmul(grad_mean, grad_var, mean, value=-2.0).mul_(slope_moments)


class SignStatistics(torch.autograd.Function):
    """``SignStatistics.apply(c, v, eps, with_moments)`` -> (l,) or (l, E[s], Var[s]) for the
    margin z = clamp(c / sqrt(v + eps), -z_max, z_max), c = m - t: the standardized margin
    is part of the node. Computed in float32 (float64 stays float64), returned in c's dtype.

    Saved for the backward: three coefficient tensors (and the mean it returns), where a
    margin computed outside the node plus a node on z kept six (c, 1/sqrt(v + eps), the
    pre-clamp z; |z|, T, B):
        k_l = (dl/dz) r [|z| <= z_max],  2 k_m = 2 phi(z) r [|z| <= z_max],  k_v = -z r / 2
    with r = 1/sqrt(v + eps); then dc = g_l k_l + (2 g_mean - 4 g_var E[s]) k_m and
    dv = dc k_v."""

    @staticmethod
    def forward(ctx, centered: Tensor, var, eps: float, with_moments: bool, z_max: float):
        c, r, z_raw, a, inside = _margin(centered, var, eps, z_max)
        tail = log_phi_tail(a)
        # Phi(-|z|): exactly 0 below the smallest normal float, without exp's slow underflow
        tail_p = torch.exp(tail.clamp_min(_EXP_ARG_MIN[tail.dtype]))
        tail_p = torch.threshold_(tail_p, _EXP_AT_MIN[tail.dtype], 0.0)
        body = torch.log1p(-tail_p)
        odds = torch.where(z_raw < 0, tail - body, body - tail)
        half_a2 = 0.5 * a * a
        r_inside = r * inside
        slope_odds = torch.exp(-half_a2 - _HALF_LOG_2PI - tail - body) * r_inside
        # the variance's coefficient only where v has a gradient (noise mode: a constant)
        slope_var = -0.5 * z_raw * r if ctx.needs_input_grad[1] else None
        ctx.with_moments = with_moments
        ctx.var_meta = (var.dtype, var.shape)
        if not with_moments:
            ctx.save_for_backward(slope_odds, slope_var)
            return (odds.to(centered.dtype),)
        mean = torch.erf(torch.copysign(a, z_raw) * _SQRT1_2)
        out_var = 4.0 * tail_p * (1.0 - tail_p)
        slope_moments = _exp_floored(-half_a2 - _HALF_LOG_2PI + _LOG_2) * r_inside   # 2 k_m
        ctx.save_for_backward(slope_odds, slope_var, slope_moments, mean)
        return odds.to(centered.dtype), mean.to(centered.dtype), out_var.to(centered.dtype)

    @staticmethod
    def backward(ctx, grad_odds, *grad_moments):
        slope_odds, slope_var, *rest = ctx.saved_tensors
        grad = torch.zeros_like(slope_odds) if grad_odds is None else grad_odds * slope_odds
        if ctx.with_moments:
            slope_moments, mean = rest
            grad_c = _moments_backward(*grad_moments, mean, slope_moments)
            if grad_c is not None:
                grad = grad + grad_c
        var_dtype, var_shape = ctx.var_meta
        grad_v = None
        if ctx.needs_input_grad[1]:
            grad_v = (grad * slope_var).sum_to_size(var_shape).to(var_dtype)
        return grad.to(grad_odds.dtype if grad_odds is not None else grad.dtype), grad_v, \
            None, None, None


class SignMoments(torch.autograd.Function):
    """``SignMoments.apply(c, v, eps, z_max)`` -> (E[s], Var[s]) of s = sign(a), a ~ N(c, v),
    margin z as in :class:`SignStatistics` (the same values as its moments): for consumers
    that never read a sample. Saves 2 k_m, E[s] and k_v (SignStatistics plus the relaxed
    sample keep five activation-sized tensors). With h = z / sqrt 2 and r_h = 1/sqrt(2v + 2eps):
    E[s] = erf(h), Var[s] = t (2 - t) with t = erfc(|h|) = 2 Phi(-|z|), 2 k_m = 2 phi(z) r =
    exp(-h^2) r_h 2/sqrt(pi), k_v = -h r_h; 16 activation-sized passes (no clamp of z: for
    z_max >= 39 it changes no value, see ``_CLAMP_FREE_Z_MAX``; the arguments of exp and erfc
    are kept off underflow, see ``_EXP_ARG_MIN``)."""

    @staticmethod
    def forward(ctx, centered: Tensor, var, eps: float, z_max: float):
        ctx.set_materialize_grads(False)
        ctx.meta = (centered.dtype, var.dtype, var.shape)
        if z_max < _CLAMP_FREE_Z_MAX:
            mean, out_var, slope_moments, slope_var = SignMoments._clamped(
                centered, var, eps, z_max, ctx.needs_input_grad[1])
        else:
            c = centered if centered.dtype == torch.float64 else centered.float()
            r_h = (var.to(c.dtype) * 2.0).add_(2.0 * eps).rsqrt_()
            h = c * r_h
            mean = torch.erf(h)
            # 2 Phi(-|z|); exactly 0 beyond |h| = 9.194 (erfc's underflow is a slow path)
            tail = torch.abs(h).clamp_max_(_ERFC_ARG_MAX[h.dtype]).erfc_()
            tail = torch.threshold_(tail, _ERFC_AT_MAX[tail.dtype], 0.0)
            out_var = torch.rsub(tail, 2.0).mul_(tail)
            slope_moments = torch.addcmul(torch.full((), _LOG_2_OVER_SQRT_PI, dtype=h.dtype,
                                                     device=h.device),
                                          h, h, value=-1.0)
            slope_moments = _exp_floored(slope_moments).mul_(r_h)
            slope_var = h.mul_(r_h).neg_() if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(slope_moments, mean, slope_var)
        return mean.to(centered.dtype), out_var.to(centered.dtype)

    @staticmethod
    def _clamped(centered, var, eps, z_max, var_grad):
        """The same values with |z| clamped to z_max (and no gradient beyond it)."""
        c, r, z_raw, a, inside = _margin(centered, var, eps, z_max)
        tail_p = 0.5 * torch.erfc(a * _SQRT1_2)                         # Phi(-|z|)
        mean = torch.erf(torch.copysign(a, z_raw) * _SQRT1_2)
        out_var = 4.0 * tail_p * (1.0 - tail_p)
        slope_moments = _exp_floored(-0.5 * a * a - _HALF_LOG_2PI + _LOG_2) * (r * inside)
        slope_var = -0.5 * z_raw * r if var_grad else None
        return mean, out_var, slope_moments, slope_var

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        slope_moments, mean, slope_var = ctx.saved_tensors
        grad = _moments_backward(grad_mean, grad_var, mean, slope_moments)
        if grad is None:
            return None, None, None, None
        c_dtype, var_dtype, var_shape = ctx.meta
        grad_v = None
        if ctx.needs_input_grad[1]:
            grad_v = (grad * slope_var).sum_to_size(var_shape).to(var_dtype)
        return grad.to(c_dtype), grad_v, None, None


class RelaxedSign(torch.autograd.Function):
    """``RelaxedSign.apply(log_odds, logistic, tau)``: the hard +-1 sample of y = l + L, with
    the binary-concrete gradient d/dl [2 sigmoid(y / tau) - 1] (none to L or tau)."""

    @staticmethod
    def forward(ctx, log_odds: Tensor, logistic: Tensor, tau):
        y = log_odds + logistic
        ctx.save_for_backward(y)
        ctx.tau = tau
        one = torch.ones((), dtype=y.dtype, device=y.device)
        return torch.where(y >= 0, one, -one)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        tau = ctx.tau
        soft = torch.sigmoid(y / tau)
        return grad * (2.0 / tau) * soft * (1.0 - soft), None, None
