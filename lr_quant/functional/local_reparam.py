"""Local reparameterization of a layer with random discrete weights.

For a linear operator A (a matmul or a convolution, any stride / padding / dilation /
groups) and independent weights with mean mu_w and variance var_w, the central limit
theorem makes every pre-activation approximately Gaussian with

    deterministic input x:        m = A(x; mu_w) + b,  v = A(x^2; var_w)
    stochastic input (m_x, v_x):  m = A(m_x; mu_w) + b,
                                  v = A(m_x^2; var_w) + A(v_x; mu_w^2 + var_w)

and it is sampled as z = m + sqrt(v + eps) * e, with one e ~ N(0, 1) per output element.
`op` is the layer's own linear operator ``op(input, weight, bias)`` (e.g. F.linear or a
partial of F.conv2d), so the same code serves every layer kind.

When every weight of an output unit has the same second moment E[w^2] = c_o (weights of
equal magnitude, e.g. binary +-alpha_o: E[w^2] = alpha_o^2 whatever the probabilities),

    A(v_x; mu_w^2 + var_w) = c_o * A1(sum_i v_x[i])

with A1 the same operator on one input channel and an all-ones kernel (a box sum): one
cheap single-channel op instead of a full convolution (``weight_sq_per_output``; dense
operators only, a grouped one falls back to the full form).

Numerics: the variance path is a sum of non-negative terms (no cancellation); under
float16 autocast it is computed in float32 (x^2 overflows float16 for |x| > 256), and the
square root and the noise are applied in float32.

# References
- Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization
  Trick". NeurIPS 2015.
- Shayer, Levi, Fetaya. "Learning Discrete Weights Using the Local Reparameterization
  Trick". ICLR 2018.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .._random import randn_replayable
from .recompute import recompute_saved

__all__ = ["LinearOp", "lr_moments", "lr_sample", "preactivation_snr", "DEFAULT_EPS"]

LinearOp = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]

DEFAULT_EPS = 1e-8


def _variance_op(op: LinearOp, x: Tensor, weight: Tensor) -> Tensor:
    """op(x, weight) for the variance path, in float32 under float16 autocast."""
    if torch.is_autocast_enabled(x.device.type) and \
            torch.get_autocast_dtype(x.device.type) == torch.float16:
        with torch.autocast(x.device.type, enabled=False):
            return op(x.float(), weight.float(), None)
    return op(x, weight, None)


def lr_moments(
        op: LinearOp,
        x: Tensor,
        weight_mean: Tensor,
        weight_var: Tensor,
        bias: Optional[Tensor] = None,
        x_var: Optional[Tensor] = None,
        weight_sq_per_output: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Mean and variance of the pre-activation op(x, w) + bias for random weights w.

    Args:
        op: the layer's linear operator, op(input, weight, bias).
        x: the input, or the input mean m_x when `x_var` is given.
        weight_mean, weight_var: per-weight mean and variance (weight-shaped).
        bias: deterministic bias added to the mean.
        x_var: variance of a stochastic input independent of the weights (or None).
        weight_sq_per_output: E[w^2] when it is the same for all weights of an output unit
            (shape [out] or one value; equals mu_w^2 + var_w); then the x_var term is a box
            sum (see the module docstring). Weights are [out, in, *kernel] (linear: [out,
            in], input channels last; conv: channels on dim 1).
    """
    if weight_mean.shape != weight_var.shape:
        raise ValueError(
            f"weight mean and variance shapes differ: {tuple(weight_mean.shape)} vs "
            f"{tuple(weight_var.shape)}")
    if x_var is not None and x_var.shape != x.shape:
        raise ValueError(
            f"input mean and variance shapes differ: {tuple(x.shape)} vs {tuple(x_var.shape)}")
    mean = op(x, weight_mean, bias)
    # x^2 is rebuilt from x (which the mean's op keeps anyway) in the backward, not kept:
    # saved-tensor hooks in eager, an activation-checkpointed square under torch.compile
    # (its partitioner would keep x^2 for the weight gradient)
    if torch.compiler.is_compiling():
        x_sq = torch.utils.checkpoint.checkpoint(torch.mul, x, x, use_reentrant=False)
        var = _variance_op(op, x_sq, weight_var)
    else:
        x_sq = x * x
        with recompute_saved((x_sq,), lambda: (x * x,)) if torch.is_grad_enabled() \
                else contextlib.nullcontext():
            var = _variance_op(op, x_sq, weight_var)
    if x_var is not None:
        channel_dim = -1 if weight_mean.dim() == 2 else 1
        dense = x_var.shape[channel_dim] == weight_mean.shape[1]   # groups == 1
        if weight_sq_per_output is None or not dense:
            var = var + _variance_op(op, x_var, weight_mean * weight_mean + weight_var)
        else:
            ones = weight_mean.new_ones((1, 1) + tuple(weight_mean.shape[2:]))
            box = _variance_op(op, x_var.sum(channel_dim, keepdim=True), ones)
            c = weight_sq_per_output.reshape(-1)
            if c.numel() > 1 and channel_dim == 1:
                c = c.view(1, -1, *([1] * (box.dim() - 2)))
            var = var + box * c
    return mean, var


def lr_sample(
        mean: Tensor,
        var: Tensor,
        eps: float = DEFAULT_EPS,
        noise: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None) -> Tensor:
    """z = mean + sqrt(var + eps) * e, e ~ N(0, 1) i.i.d. per element.

    The square root and the noise are computed in at least float32; the result has the
    dtype of `mean`. Pass `noise` to reuse a draw (e.g. for finite differences).
    """
    compute_dtype = torch.promote_types(mean.dtype, torch.float32)
    replay = None
    if noise is None:
        noise, replay = randn_replayable(mean, compute_dtype, generator)
    elif noise.shape != mean.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != mean shape {tuple(mean.shape)}")
    if noise.requires_grad:   # a caller differentiating through its own draw
        std = torch.sqrt(var.to(compute_dtype) + eps)
        return torch.addcmul(mean.to(compute_dtype), std, noise).to(mean.dtype)
    return _GaussianSample.apply(mean, var, noise, eps, replay)


class _GaussianSample(torch.autograd.Function):
    """z = m + sqrt(v + eps) e with dz/dm = 1, dz/dv = e / (2 sqrt(v + eps)). Saves v and,
    for e, the generator state it was drawn from when ``replay`` is given (the backward draws
    e again, bit for bit; else e itself); not the square root: v is the LR layer's own
    output (a moment-mode BatchNorm keeps it anyway), and the root is rebuilt in the
    backward. var >= 0 by construction (sums of non-negative products): no clamp, which
    would zero the gradient at v = 0."""

    @staticmethod
    def forward(ctx, mean: Tensor, var: Tensor, noise: Tensor, eps: float,
                replay: Optional[Callable[[], Tensor]] = None):
        std = torch.sqrt(var.to(noise.dtype) + eps)
        ctx.eps, ctx.dtypes = eps, (mean.dtype, var.dtype)
        needs_var = ctx.needs_input_grad[1]
        ctx.replay = replay if needs_var else None
        ctx.save_for_backward(var if needs_var else None,
                              noise if needs_var and replay is None else None)
        return torch.addcmul(mean.to(noise.dtype), std, noise).to(mean.dtype)

    @staticmethod
    def backward(ctx, grad):
        var, noise = ctx.saved_tensors
        if ctx.replay is not None:
            noise = ctx.replay()
        mean_dtype, var_dtype = ctx.dtypes
        grad_var = None
        if ctx.needs_input_grad[1]:
            g = grad.to(noise.dtype)
            grad_var = (g * noise * (0.5 * torch.rsqrt(var.to(noise.dtype) + ctx.eps))
                        ).sum_to_size(var.shape).to(var_dtype)
        grad_mean = grad.to(mean_dtype) if ctx.needs_input_grad[0] else None
        return grad_mean, grad_var, None, None, None


def preactivation_snr(mean: Tensor, var: Tensor, channel_dim: int = 1) -> Tensor:
    """Signal-to-noise ratio of LR pre-activations, per output channel:

        snr_c = Var_{n, positions}(m_c) / E_{n, positions}[v_c]

    The numerator is how much the noise-free pre-activation varies across inputs (what
    carries information, and what a following BatchNorm scales to unit variance); the
    denominator is the mean local-reparameterization noise variance. snr_c << 1 means the
    channel's sampled output is mostly noise (a BatchNorm after it normalizes noise).
    `mean` and `var` are (batch, ..., channels at `channel_dim`, ...) tensors.
    """
    if mean.shape != var.shape:
        raise ValueError(f"mean and variance shapes differ: {tuple(mean.shape)} vs "
                         f"{tuple(var.shape)}")
    dim = channel_dim % mean.dim()
    m = mean.movedim(dim, 0).reshape(mean.shape[dim], -1).double()
    v = var.movedim(dim, 0).reshape(var.shape[dim], -1).double()
    if m.shape[1] < 2:
        raise ValueError("the SNR needs at least two samples per channel")
    return m.var(dim=1) / v.mean(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
