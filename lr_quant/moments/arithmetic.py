"""Moments through elementwise arithmetic: + - * / (also in place and reflected) with
constants or independent MomentTensors, and negation."""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

from .tensor import (NOT_HANDLED, MomentTensor, _disabled, _wrap, has_moments, register,
                     register_deferred)


def _is_constant(c: Any, ref: Tensor) -> bool:
    """A value an affine map treats as deterministic: a number or a tensor without moments."""
    if isinstance(c, numbers.Number):
        return True
    return isinstance(c, Tensor) and not has_moments(c)


# --- elementwise arithmetic ----------------------------------------------------------


def _affine_moments(op: str, a, b, alpha=1):
    """(mean, var) of `a op b` or None if not moment-preserving. a, b: MomentTensor / const."""
    am, bm = has_moments(a), has_moments(b)
    with _disabled():
        if op in ("add", "sub"):
            sgn = alpha if op == "add" else -alpha
            if am and bm:
                return a.moment_mean + sgn * b.moment_mean, a.moment_var + (sgn ** 2) * b.moment_var
            if am and _is_constant(b, a):
                return a.moment_mean + sgn * b, a.moment_var
            if bm and _is_constant(a, b):
                return a + sgn * b.moment_mean, (sgn ** 2) * b.moment_var
            return None
        if op == "mul":
            if am and bm:
                ma, va, mb, vb = a.moment_mean, a.moment_var, b.moment_mean, b.moment_var
                return ma * mb, va * vb + va * mb ** 2 + vb * ma ** 2
            if am and _is_constant(b, a):
                return a.moment_mean * b, a.moment_var * (b * b)
            if bm and _is_constant(a, b):
                return a * b.moment_mean, b.moment_var * (a * a)
            return None
        if op == "div":
            if am and not isinstance(b, MomentTensor) and _is_constant(b, a):
                return a.moment_mean / b, a.moment_var / (b * b)
            return None
    raise AssertionError(op)


def _binary_rule(op: str, reflected: bool = False):
    """rule(func, args, kwargs) -> (mean, var) of ``args[0] op args[1]`` or None."""
    def rule(func, args, kwargs):
        if len(args) < 2 or set(kwargs) - {"alpha"}:
            return None   # e.g. div(rounding_mode=...), out=...
        x, y = args[0], args[1]
        a, b = (y, x) if reflected else (x, y)
        return _affine_moments(op, a, b, kwargs.get("alpha", 1))
    return rule


def _make_binary_handler(op: str, reflected: bool = False, inplace: bool = False):
    rule = _binary_rule(op, reflected)

    def handler(func, args, kwargs):
        mom = rule(func, args, kwargs)
        if mom is None:
            return NOT_HANDLED
        x = args[0]
        if inplace:
            if not has_moments(x):
                return NOT_HANDLED
            with _disabled():
                func(*args, **kwargs)   # mutate the sample in place
            mean, var = mom
            with _disabled():
                if mean.shape != x.shape:
                    mean, var = mean.expand(x.shape), var.expand(x.shape)
            x._set_moments(mean, var)   # after the mutation: records the new version
            return x
        with _disabled():
            data = func(*args, **kwargs)
        return _wrap(data, *mom)
    return handler


T = Tensor
for _op, _funcs in {
        "add": (torch.add, T.add, T.__add__),
        "sub": (torch.sub, torch.subtract, T.sub, T.subtract, T.__sub__),
        "mul": (torch.mul, torch.multiply, T.mul, T.multiply, T.__mul__),
        "div": (torch.div, torch.divide, torch.true_divide, T.div, T.divide, T.true_divide,
                T.__truediv__, T.__div__ if hasattr(T, "__div__") else None),
}.items():
    register(*_funcs)(_make_binary_handler(_op))
    register_deferred(*_funcs)(_binary_rule(_op))
for _op, _func in {"add": T.__radd__, "sub": T.__rsub__, "mul": T.__rmul__}.items():
    register(_func)(_make_binary_handler(_op, reflected=True))
    register_deferred(_func)(_binary_rule(_op, reflected=True))
for _op, _funcs in {
        "add": (T.add_, T.__iadd__),
        "sub": (T.sub_, T.subtract_, T.__isub__),
        "mul": (T.mul_, T.multiply_, T.__imul__),
        "div": (T.div_, T.divide_, T.true_divide_, T.__itruediv__),
}.items():
    register(*_funcs)(_make_binary_handler(_op, inplace=True))
    register_deferred(*_funcs, inplace=True)(_binary_rule(_op))


_NEG = (torch.neg, torch.negative, T.neg, T.negative, T.__neg__)


@register_deferred(*_NEG)
def _neg_rule(func, args, kwargs):
    x = args[0]
    if not has_moments(x) or kwargs:
        return None
    with _disabled():
        return -x.moment_mean, x.moment_var


@register(*_NEG)
def _neg(func, args, kwargs):
    mom = _neg_rule(func, args, kwargs)
    if mom is None:
        return NOT_HANDLED
    with _disabled():
        return _wrap(func(*args), *mom)
