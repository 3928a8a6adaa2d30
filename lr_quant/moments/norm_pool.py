"""Moments through BatchNorm (an affine map per channel), average pooling and mean / sum
reductions (elements of a window assumed independent: variances pooled with 1/n^2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .tensor import NOT_HANDLED, _disabled, _has_any_moments, _wrap, has_moments, register

T = Tensor


@register(F.batch_norm)
def _batch_norm(func, args, kwargs):
    names = ("input", "running_mean", "running_var", "weight", "bias", "training",
             "momentum", "eps")
    b = dict(zip(names, args))
    b.update(kwargs)
    x = b["input"]
    if not has_moments(x) or _has_any_moments(b.get("weight"), b.get("bias")):
        return NOT_HANDLED
    training = b.get("training", False)
    eps = b.get("eps", 1e-5)
    weight, bias = b.get("weight"), b.get("bias")
    rm, rv = b.get("running_mean"), b.get("running_var")
    with _disabled():
        data = func(*args, **kwargs)
        shape = [1, -1] + [1] * (x.dim() - 2)
        if training or rm is None or rv is None:
            dims = [d for d in range(x.dim()) if d != 1]
            var_b, mu = torch.var_mean(x, dim=dims, correction=0)   # one pass
        else:
            mu, var_b = rm, rv
        scale = torch.rsqrt(var_b + eps)
        if weight is not None:
            scale = scale * weight
        mean = (x.moment_mean - mu.view(shape)) * scale.view(shape)
        if bias is not None:
            mean = mean + bias.view(shape)
        var = x.moment_var * (scale * scale).view(shape)
    return _wrap(data, mean, var)


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
