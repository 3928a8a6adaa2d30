"""Moments through shape and copy ops (mean and variance follow the op), cat / stack of
MomentTensors, and dropout that is the identity (eval or p = 0)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .tensor import NOT_HANDLED, _disabled, _has_any_moments, _wrap, has_moments, register

T = Tensor


def _structural(func, args, kwargs):
    x = args[0] if args else None
    if not has_moments(x) or _has_any_moments(args[1:], kwargs) or "out" in kwargs:
        return NOT_HANDLED
    with _disabled():
        data = func(*args, **kwargs)
        mean = func(x.moment_mean, *args[1:], **kwargs)
        var = func(x.moment_var, *args[1:], **kwargs)
    if isinstance(data, (tuple, list)):
        return type(data)(_wrap(d, m, v) for d, m, v in zip(data, mean, var))
    if not isinstance(data, Tensor):
        return data
    return _wrap(data, mean, var)


_STRUCTURAL = [
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "squeeze",
    "unsqueeze", "contiguous", "clone", "detach", "expand", "narrow", "select", "movedim",
    "moveaxis", "flip", "roll", "rename", "to", "float", "double", "half", "bfloat16", "cpu",
    "__getitem__", "chunk", "split", "unbind", "swapaxes", "swapdims",
]
for _name in _STRUCTURAL:   # the Tensor method and, where it exists, the torch function
    register(getattr(T, _name, None), getattr(torch, _name, None))(_structural)
register(torch.clone, torch.detach, torch.flatten, torch.reshape)(_structural)


@register(torch.cat, torch.concat, torch.concatenate, torch.stack)
def _cat(func, args, kwargs):
    tensors = args[0] if args else kwargs.get("tensors")
    if tensors is None or not all(has_moments(t) for t in tensors) or "out" in kwargs:
        return NOT_HANDLED
    rest = args[1:]
    with _disabled():
        data = func(tensors, *rest, **kwargs)
        mean = func([t.moment_mean for t in tensors], *rest, **kwargs)
        var = func([t.moment_var for t in tensors], *rest, **kwargs)
    return _wrap(data, mean, var)


def _dropout_handler(func, args, kwargs):
    names = ("input", "p", "training", "inplace")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    x = bound.get("input")
    p = bound.get("p", 0.5)
    training = bound.get("training", True)
    if has_moments(x) and (not training or p == 0):
        return x
    return NOT_HANDLED


register(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
          F.feature_alpha_dropout)(_dropout_handler)
