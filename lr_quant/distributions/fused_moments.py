"""Mean and variance of binary and ternary weights, optionally scaled per channel, as
single autograd nodes with hand-derived backward passes (formulas in each class)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BinaryMoments", "TernaryMoments", "ScaledMoments"]


def _sech2_half(logits: Tensor) -> Tensor:
    """sech^2(t/2) = 4 sigmoid(t) sigmoid(-t) = 4e / (1 + e)^2, e = exp(-|t|)."""
    e = torch.exp(-logits.abs())
    return 4.0 * e / (1.0 + e).square_()


class ScaledMoments(torch.autograd.Function):
    """(mu s, var s^2) of a per-weight distribution with a per-channel scale s (or s = 1
    when None), fused into one autograd node: only the logits and s are saved, and the
    backward recomputes the elementwise statistics instead of keeping weight-sized tensors
    alive (ternary: 6 fewer per layer; binary has its own node, :class:`BinaryMoments`,
    which saves its outputs instead). Subclasses give ``_stats(logits)`` ->
    (mu, var, aux) and ``_grad_logits(logits, aux, g_mu, g_var)`` for the unscaled
    moments; then d/ds = sum(g_m mu + 2 s g_v var) and the logits see g_m s, g_v s^2.

    ``forward`` / ``backward`` are static methods that look the subclass up on ``ctx``
    (torch.compile traces static ``forward(ctx, ...)`` only)."""

    @staticmethod
    def _stats(logits):
        raise NotImplementedError

    @staticmethod
    def _grad_logits(logits, aux, grad_mean, grad_var):
        raise NotImplementedError

    @staticmethod
    def forward(ctx, logits, scale, kind):
        mean, var, _ = kind._stats(logits)
        ctx.kind = kind
        if scale is None:
            ctx.save_for_backward(logits)
            return mean, var
        ctx.save_for_backward(logits, scale)
        return mean * scale, var * (scale * scale)

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        kind = ctx.kind
        logits, *rest = ctx.saved_tensors
        mean, var, aux = kind._stats(logits)
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        grad_var = torch.zeros_like(var) if grad_var is None else grad_var
        if not rest:
            return kind._grad_logits(logits, aux, grad_mean, grad_var), None, None
        (scale,) = rest
        grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = (grad_mean * mean + 2.0 * scale * grad_var * var).sum_to_size(
                scale.shape)
        grad_logits = kind._grad_logits(logits, aux, grad_mean * scale,
                                        grad_var * (scale * scale))
        return grad_logits, grad_scale, None

    @classmethod
    def moments(cls, logits, scale=None):
        """(mu s, var s^2) as one autograd node."""
        return ScaledMoments.apply(logits, scale, cls)


class TernaryMoments(ScaledMoments):
    """Shayer's ternary moments with p0 = sigmoid(a), n = 1 - p0 = sigmoid(-a),
    m = 2q - 1 = tanh(b/2), r = 4q(1 - q) = sech^2(b/2):  mu = n m,
    var = n (p0 m^2 + r)  (non-negative terms, p0 and n each computed directly).
    Backward by hand: dmu/da = -n p0 m, dmu/db = n r / 2,
    dvar/da = -n p0 ((p0 - n) m^2 + r), dvar/db = -n^2 r m."""

    @staticmethod
    def _stats(logits):
        p_zero = torch.sigmoid(logits[0])
        n = torch.sigmoid(-logits[0])
        m = torch.tanh(0.5 * logits[1])
        r = _sech2_half(logits[1])
        return n * m, n * (p_zero * m.square() + r), (p_zero, n, m, r)

    @staticmethod
    def _grad_logits(logits, aux, grad_mean, grad_var):
        p_zero, n, m, r = aux
        grad_a = -(n * p_zero) * (grad_mean * m + grad_var * ((p_zero - n) * m.square() + r))
        grad_b = n * r * (0.5 * grad_mean - grad_var * n * m)
        return torch.stack([grad_a, grad_b])


def _channel_dot(a: Tensor, b: Tensor, shape) -> Tensor:
    """sum(a * b) over every dim where the broadcastable `shape` is 1, in one read pass where
    it can (a dot product per tensor or per leading channel; no product tensor)."""
    shape = tuple(shape)
    if all(n == 1 for n in shape):
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(shape)
    if shape[0] == a.shape[0] and all(n == 1 for n in shape[1:]):
        c = a.shape[0]
        return torch.einsum("ck,ck->c", a.reshape(c, -1), b.reshape(c, -1)).reshape(shape)
    return (a * b).sum_to_size(shape)


# |s| below this (or the dtype's smallest normal) is raised to it (sign +): the backward
# divides the saved outputs by s, and at s = 0 they would have lost mu. The outputs move by
# < 1e-30 |mu| in float32.
_SMALLEST_SCALE = 1e-30


class BinaryMoments(torch.autograd.Function):
    """mu = p - q, var = 4 p q with p = sigmoid(theta), q = sigmoid(-theta), each computed
    directly (no 1 - p: var stays accurate and > 0 for every theta; mu = tanh(theta/2) to
    float rounding), times s and s^2 for a per-channel scale s. One node, 7 weight-sized
    passes forward and 5 backward (3 without a scale): it saves its own
    outputs M = mu s, V = var s^2, which the convolutions after it keep anyway, so the
    backward needs no sigmoid (recomputing the statistics from theta took 12 passes; the
    composed tanh / sech^2 form took 11 and 19). Backward by hand:
        dmu/dtheta = var / 2,  dvar/dtheta = -var mu
        d/dtheta = (V / s)(g_m / 2 - g_v M),  d/ds = (sum(g_m M) + 2 sum(g_v V)) / s
    (1/s is per channel; |s| < 1e-30 is raised to 1e-30 first, so s = 0 keeps a gradient)."""

    @staticmethod
    def forward(ctx, logits, scale):
        p = torch.sigmoid(logits)
        q = torch.sigmoid(-logits)
        mean, var = torch.sub(p, q), p.mul_(q)
        if scale is None:
            var.mul_(4.0)
            ctx.save_for_backward(mean, var, None)
            return mean, var
        smallest = max(_SMALLEST_SCALE, torch.finfo(scale.dtype).tiny)   # float16: 6e-5
        scale = torch.where(scale.abs() < smallest, torch.full_like(scale, smallest), scale)
        mean.mul_(scale)
        var.mul_(4.0 * scale * scale)
        ctx.save_for_backward(mean, var, scale)
        return mean, var

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        mean, var, scale = ctx.saved_tensors
        # g_m - 2 g_v M, then times V and 1/2 (or 1/(2 s))
        grad = torch.addcmul(grad_mean, grad_var, mean, value=-2.0).mul_(var)
        if scale is None:
            return grad.mul_(0.5), None
        inverse = torch.reciprocal(scale)
        grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = (_channel_dot(grad_mean, mean, scale.shape) +
                          2.0 * _channel_dot(grad_var, var, scale.shape)) * inverse
        return grad.mul_(0.5 * inverse), grad_scale

    @classmethod
    def moments(cls, logits, scale=None):
        """(mu s, var s^2) as one autograd node."""
        return cls.apply(logits, scale)
