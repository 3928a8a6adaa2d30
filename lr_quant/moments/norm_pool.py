"""Moments through BatchNorm (an affine map per channel), average pooling and mean / sum
reductions (elements of a window assumed independent: variances pooled with 1/n^2)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .tensor import (NOT_HANDLED, _disabled, _has_any_moments, _wrap, has_moments, register,
                     register_deferred)

T = Tensor


_BN_NAMES = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
             "eps")


def _bn_affine(mean: Tensor, var: Tensor, mu: Tensor, var_b: Tensor, weight, bias, eps: float,
               centered: Optional[Tensor] = None):
    """BatchNorm's per-channel affine map y = (x - mu) w / sqrt(var_b + eps) + b on the
    moments: m' = (m - mu) k + b, v' = v k^2 with k = w / sqrt(var_b + eps) (`centered`:
    m - mu if the caller has it)."""
    shape = [1, -1] + [1] * (mean.dim() - 2)
    scale = torch.rsqrt(var_b + eps)
    if weight is not None:
        scale = scale * weight
    if centered is None:
        centered = mean - mu.view(shape)
    if bias is not None:
        out_mean = torch.addcmul(bias.view(shape), centered, scale.view(shape))   # one pass
    else:
        out_mean = centered * scale.view(shape)
    return out_mean, var * (scale * scale).view(shape)


@register(F.batch_norm)
def _batch_norm(func, args, kwargs):
    b = dict(zip(_BN_NAMES, args))
    b.update(kwargs)
    x = b["input"]
    if not has_moments(x) or _has_any_moments(b.get("weight"), b.get("bias")):
        return NOT_HANDLED
    rm, rv = b.get("running_mean"), b.get("running_var")
    with _disabled():
        data = func(*args, **kwargs)
        if b.get("training", False) or rm is None or rv is None:
            dims = [d for d in range(x.dim()) if d != 1]
            var_b, mu = torch.var_mean(x, dim=dims, correction=0)   # one pass
        else:
            mu, var_b = rm, rv
        mean, var = _bn_affine(x.moment_mean, x.moment_var, mu, var_b, b.get("weight"),
                               b.get("bias"), b.get("eps", 1e-5))
    return _wrap(data, mean, var)


@register_deferred(F.batch_norm)
def _batch_norm_deferred(func, args, kwargs):
    """BatchNorm of a deferred MomentTensor (no sample drawn): in training, the batch
    statistics are those of the random tensor, by the law of total variance over the
    batch's positions i: mu_B = mean_i(m_i), var_B = var_i(m_i) + mean_i(v_i) (what the
    statistics of a sample estimate); the running statistics move toward them as
    F.batch_norm moves them (momentum, unbiased variance n / (n - 1))."""
    b = dict(zip(_BN_NAMES, args))
    b.update(kwargs)
    x = b["input"]
    if _has_any_moments(b.get("weight"), b.get("bias")):
        return None
    rm, rv = b.get("running_mean"), b.get("running_var")
    with _disabled():
        mean, var = x.moment_mean, x.moment_var
        if b.get("training", False) or rm is None or rv is None:
            dims = [d for d in range(mean.dim()) if d != 1]
            n = mean.numel() // mean.shape[1]
            # sums scaled by 1/n on the per-channel vectors: their backward is an expand,
            # where mean()'s divides the whole gradient
            mu = mean.sum(dim=dims) * (1.0 / n)
            # var_i(m_i) from the centered m - mu, which the affine map keeps for its
            # backward anyway (var_mean would keep m as well)
            centered = mean - mu.view([1, -1] + [1] * (mean.dim() - 2))
            var_b = ((centered * centered).sum(dim=dims) + var.sum(dim=dims)) * (1.0 / n)
            if b.get("training", False) and rm is not None and rv is not None:
                if n < 2:
                    raise ValueError(
                        f"Expected more than 1 value per channel when training, got input "
                        f"size {list(mean.shape)}")
                momentum = b.get("momentum", 0.1)
                momentum = 0.1 if momentum is None else float(momentum)
                with torch.no_grad():
                    rm.mul_(1 - momentum).add_(mu.detach().to(rm.dtype), alpha=momentum)
                    rv.mul_(1 - momentum).add_(var_b.detach().to(rv.dtype) * (n / (n - 1)),
                                               alpha=momentum)
        else:
            mu, var_b, centered = rm, rv, None
        return _bn_affine(mean, var, mu, var_b, b.get("weight"), b.get("bias"),
                          b.get("eps", 1e-5), centered)


# --- pooling and reductions ----------------------------------------------------------


def _on_sample_and_moments(func, x, args, kwargs):
    """(func(sample), func(mean), func(var)): a pooling applied to all three (the variance
    still needs the pool's weights, which each caller applies)."""
    return (func(*args, **kwargs), func(x.moment_mean, *args[1:], **kwargs),
            func(x.moment_var, *args[1:], **kwargs))


def _avg_pool_handler(nd: int):
    names = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
             "divisor_override")

    def handler(func, args, kwargs):
        b = dict(zip(names, args))
        b.update(kwargs)
        x = b["input"]
        if not has_moments(x):
            return NOT_HANDLED
        with _disabled():
            data, mean, pooled_var = _on_sample_and_moments(func, x, args, kwargs)
            # weight 1/d of each window: pool(ones) = n_valid / d, sum-pool(ones) = n_valid
            ones = torch.ones((1, 1) + tuple(x.shape[-nd:]), dtype=x.dtype, device=x.device)
            b1 = dict(b)
            b1.pop("input")
            n_over_d = func(ones, **b1)
            b1["divisor_override"] = 1
            n_valid = func(ones, **b1)
            weight = n_over_d / n_valid
            lead = x.dim() - nd
            weight = weight.reshape((1,) * lead + tuple(weight.shape[-nd:]))
            var = pooled_var * weight
        return _wrap(data, mean, var)
    return handler


register(F.avg_pool2d, torch._C._nn.avg_pool2d)(_avg_pool_handler(2))
register(F.avg_pool3d, torch._C._nn.avg_pool3d)(_avg_pool_handler(3))


def _adaptive_counts(in_size: int, out_size: int) -> Tensor:
    i = torch.arange(out_size)
    start = torch.div(i * in_size, out_size, rounding_mode="floor")
    end = -torch.div(-(i + 1) * in_size, out_size, rounding_mode="floor")   # ceil
    return (end - start).to(torch.float64)


def _adaptive_avg_pool_handler(nd: int):
    def handler(func, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        output_size = args[1] if len(args) > 1 else kwargs.get("output_size")
        if not has_moments(x):
            return NOT_HANDLED
        with _disabled():
            data, mean, pooled_var = _on_sample_and_moments(func, x, args, kwargs)
            sizes = (output_size,) * nd if isinstance(output_size, int) else tuple(output_size)
            count = torch.ones(())
            for k, (n_in, n_out) in enumerate(zip(x.shape[-nd:], sizes)):
                n_out = n_in if n_out is None else n_out
                c = _adaptive_counts(n_in, n_out)
                count = count.unsqueeze(-1) * c if k else c
            var = pooled_var / count.to(dtype=x.dtype, device=x.device)
        return _wrap(data, mean, var)
    return handler


register(F.adaptive_avg_pool1d, torch.adaptive_avg_pool1d)(_adaptive_avg_pool_handler(1))
register(F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d)(_adaptive_avg_pool_handler(2))
register(F.adaptive_avg_pool3d, torch._C._nn.adaptive_avg_pool3d)(_adaptive_avg_pool_handler(3))


def _reduction_handler(kind: str):
    def handler(func, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        if not has_moments(x) or "out" in kwargs:
            return NOT_HANDLED
        dim = args[1] if len(args) > 1 else kwargs.get("dim", None)
        keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        if len(args) > 3 or set(kwargs) - {"input", "dim", "keepdim"}:
            return NOT_HANDLED   # dtype= etc.
        with _disabled():
            data = func(*args, **kwargs)
            if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
                dims = list(range(x.dim()))
            else:
                dims = [dim] if isinstance(dim, int) else list(dim)
            n = math.prod(x.shape[d] for d in dims)
            if dim is None:
                mean = x.moment_mean.sum() if kind == "sum" else x.moment_mean.mean()
                vsum = x.moment_var.sum()
            else:
                mean = getattr(x.moment_mean, kind)(dims, keepdim=keepdim)
                vsum = x.moment_var.sum(dims, keepdim=keepdim)
            var = vsum if kind == "sum" else vsum / (n * n)
        return _wrap(data, mean, var)
    return handler


register(torch.mean, T.mean)(_reduction_handler("mean"))
register(torch.sum, T.sum)(_reduction_handler("sum"))
