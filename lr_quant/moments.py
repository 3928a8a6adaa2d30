"""Gaussian moments that travel between modules: ``MomentTensor``.

An LR layer in training produces, for every output element, a Gaussian N(m, v) (local
reparameterization). A downstream LR layer or stochastic sign can use (m, v) directly
instead of a single sample, which lowers the variance of the gradient (Shayer et al. 2018;
Roth et al. 2019). Between two such layers sits an arbitrary graph (a timm block:
BatchNorm, residual add, pooling, reshapes ...), so the moments travel *with* the tensor.

Contract
--------
``MomentTensor`` is a ``torch.Tensor`` subclass whose **data is a reparameterized sample**
(``mean + sqrt(var) * N(0, 1)`` unless the producer passes its own sample), so any op
that does not know about moments still receives a valid stochastic tensor. It carries

    x.moment_mean   tensor of x.shape, differentiable (or None once invalidated)
    x.moment_var    tensor of x.shape, >= 0, differentiable (or None once invalidated)

- Producer (an LR layer in training):
  ``return MomentTensor.from_moments(m, v, sample=m + sqrt(v + eps) * e)``.
- Consumer (an LR layer, a stochastic sign): ``mean, var = split_moments(x)``;
  ``var is None`` means a deterministic input (``mean`` is then x itself).

Moment-preserving ops (implemented in ``__torch_function__``; the sample follows the op
exactly as on a plain tensor, the moments follow the rules below):

- elementwise affine with *constants*: ``+ - * /`` and their in-place / reflected forms
  with a Python number or any tensor without moments (a parameter, a buffer, or a plain
  tensor such as a residual shortcut); ``neg``. Moments are *conditional on every plain
  tensor*: a plain tensor is a realized value, and an LR layer fed a plain tensor treats
  it as deterministic too, so e.g. ``branch(x) + x`` for a plain block input x is exact.
  (The one approximate case is a plain tensor computed from the *sample* of a MomentTensor
  combined with that MomentTensor's descendants: their correlation is ignored, like the
  independence assumption below.)
- ``add``/``sub``/``mul`` of two MomentTensors, assumed independent (the standard LR-net
  approximation; a residual branch and its shortcut are correlated in truth):
  means add, variances add; products use Var = va vb + va mb^2 + vb ma^2.
- ``F.batch_norm`` in eval (running statistics: an affine map per channel) and in training:
  the data is normalized by ``F.batch_norm`` with the batch statistics of the *sample*
  (mu_B, var_B, what F.batch_norm computes on the data) and the moments go through the same
  affine map: m' = (m - mu_B) w / sqrt(var_B + eps) + b, v' = v w^2 / (var_B + eps).
- ``avg_pool2d``/``avg_pool3d`` (any padding, ``ceil_mode``, ``count_include_pad``,
  ``divisor_override``), ``adaptive_avg_pool1d/2d/3d``, ``mean`` and ``sum`` over dims:
  mean pooled, variance pooled with the squared weights (1/n^2 each) - elements of a window
  assumed independent.
- shape / copy ops applied to mean and var alike: view, reshape, flatten, permute,
  transpose, squeeze, unsqueeze, contiguous, clone, detach, expand, narrow, select,
  indexing, movedim, flip, rename, to / float / double / half, cat and stack (of
  MomentTensors only), dropout with ``training=False`` or ``p == 0``, identity.

Every other op (ReLU, convolution, linear, softmax ...) returns a **plain tensor** (the
op applied to the sample): never a MomentTensor with wrong moments. In-place ops that are
not moment-preserving (``relu_``, ``x[...] = ...``, ``F.relu(x, inplace=True)``), also
through a view of the same storage, invalidate the moments of the mutated MomentTensor
(tracked with the tensor's version counter: ``moment_mean`` / ``moment_var`` become None,
and ``split_moments`` then treats it as plain).

ReLU is deliberately *not* moment-preserving (the rectified Gaussian's moments would be
exact, but the next sign needs the Gaussian): for a sign with threshold t > 0,
sign(ReLU(a) - t) = sign(a - t), so a converter should drop a ReLU that feeds a thresholded
sign and the moment path stays Gaussian end to end.

Autograd flows from the sample and from both moments; ``torch.no_grad`` works as usual.

# References
- Shayer, Levi, Fetaya. "Learning Discrete Weights Using the Local Reparameterization
  Trick". ICLR 2018.
- Roth, Schindler, Fröning, Pernkopf. "Training Discrete-Valued Neural Networks with Sign
  Activations Using Weight Distributions". ECML-PKDD 2019.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_flatten

__all__ = ["MomentTensor", "split_moments", "has_moments", "MOMENT_PRESERVING_OPS"]

_Handler = Callable[[Callable, tuple, dict], Any]
_HANDLERS: Dict[Callable, _Handler] = {}
_NOT_HANDLED = object()


def _disabled():
    return torch._C.DisableTorchFunctionSubclass()


def has_moments(x: Any) -> bool:
    """True for a MomentTensor whose moments are valid (its data not mutated since)."""
    return isinstance(x, MomentTensor) and x.moment_mean is not None


def split_moments(x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """(mean, var) of a MomentTensor; (x, None) for a plain (deterministic) tensor."""
    if has_moments(x):
        return x.moment_mean, x.moment_var
    return x, None


def _safe_std(var: Tensor) -> Tensor:
    # sqrt with a zero (not inf * 0 = nan) gradient where var == 0
    pos = var > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, var, torch.ones_like(var))),
                       torch.zeros_like(var))


def _wrap(data: Tensor, mean: Tensor, var: Tensor) -> "MomentTensor":
    with _disabled():
        if mean.shape != data.shape:
            mean = mean.expand(data.shape)
        if var.shape != data.shape:
            var = var.expand(data.shape)
        out = data.as_subclass(MomentTensor)
    out._set_moments(mean, var)
    return out


def _data_version(t: Tensor) -> int:
    with _disabled():
        try:
            return t._version
        except RuntimeError:   # inference tensors have no version counter
            return -1


class MomentTensor(Tensor):
    """A sample of a random tensor that carries its elementwise mean and variance.

    Build it with :meth:`from_moments`; read it with :func:`split_moments`. See the module
    docstring for the ops that keep the moments.
    """

    _mm: Optional[Tensor] = None
    _mv: Optional[Tensor] = None
    _moment_version: int = -2

    def _set_moments(self, mean: Optional[Tensor], var: Optional[Tensor]) -> None:
        self._mm, self._mv = mean, var
        self._moment_version = _data_version(self)

    def _moments_valid(self) -> bool:
        # any in-place write to the data, through this tensor or any view of its storage,
        # bumps the shared version counter and so invalidates the moments
        return self._mm is not None and self._moment_version == _data_version(self)

    @property
    def moment_mean(self) -> Optional[Tensor]:
        """Elementwise mean, or None if the data was mutated by a non-preserving op."""
        return self._mm if self._moments_valid() else None

    @property
    def moment_var(self) -> Optional[Tensor]:
        """Elementwise variance (>= 0), or None like moment_mean."""
        return self._mv if self._moments_valid() else None

    @classmethod
    def from_moments(cls, mean: Tensor, var: Tensor, sample: Optional[Tensor] = None,
                     generator: Optional[torch.Generator] = None, *,
                     validate: bool = True) -> "MomentTensor":
        """Wrap moments (mean, var) and a sample; draw ``mean + sqrt(var) * N(0, 1)`` when
        ``sample`` is None. All three must have one shape; var must be >= 0 (checked when
        ``validate``: one device sync; pass False in hot loops that guarantee it)."""
        if has_moments(mean) or has_moments(var):
            raise TypeError("from_moments expects plain tensors for mean and var")
        if not (isinstance(mean, Tensor) and isinstance(var, Tensor)):
            raise TypeError("mean and var must be tensors")
        if mean.shape != var.shape:
            raise ValueError(
                f"mean and var shapes differ: {tuple(mean.shape)} vs {tuple(var.shape)}")
        if not mean.is_floating_point():
            raise TypeError("mean and var must be floating point")
        if validate:
            with torch.no_grad(), _disabled():
                if bool((var < 0).any()):
                    raise ValueError("var must be >= 0")
        if sample is None:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                                device=mean.device)
            sample = mean + _safe_std(var) * noise
        elif tuple(sample.shape) != tuple(mean.shape):
            raise ValueError(
                f"sample shape {tuple(sample.shape)} != moment shape {tuple(mean.shape)}")
        return _wrap(sample, mean, var)

    @property
    def has_moments(self) -> bool:
        return has_moments(self)

    def plain(self) -> Tensor:
        """The sample as a plain tensor (autograd-connected alias)."""
        with _disabled():
            return self.as_subclass(Tensor)

    def __repr__(self, *, tensor_contents=None):  # noqa: D105
        with _disabled():
            body = repr(self.as_subclass(Tensor))
        return f"MomentTensor(sample={body}, has_moments={self.has_moments})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(not issubclass(t, Tensor) for t in types):
            # another tensor-like (e.g. Brevitas' QuantTensor) handles the op first; it
            # calls the op again on plain values (and on this MomentTensor).
            return NotImplemented
        handler = _HANDLERS.get(func)
        if handler is not None:
            out = handler(func, args, kwargs)
            if out is not _NOT_HANDLED:
                return out
        return _plain_call(func, args, kwargs)


def _plain_call(func, args, kwargs):
    """Run func on the samples. A MomentTensor mutated in place loses its moments (its
    version counter moves, see MomentTensor._moments_valid)."""
    with _disabled():
        return func(*args, **kwargs)


def _register(*funcs):
    def deco(handler):
        for f in funcs:
            if callable(f) and not isinstance(f, torch.dtype):
                _HANDLERS[f] = handler
        return handler
    return deco


def _has_any_moments(*objs) -> bool:
    flat, _ = tree_flatten(objs)
    return any(isinstance(a, MomentTensor) for a in flat)


# --- constants -----------------------------------------------------------------------


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


def _make_binary_handler(op: str, reflected: bool = False, inplace: bool = False):
    def handler(func, args, kwargs):
        if len(args) < 2:
            return _NOT_HANDLED
        x, y = args[0], args[1]
        if set(kwargs) - {"alpha"}:
            return _NOT_HANDLED   # e.g. div(rounding_mode=...), out=...
        alpha = kwargs.get("alpha", 1)
        a, b = (y, x) if reflected else (x, y)
        mom = _affine_moments(op, a, b, alpha)
        if mom is None:
            return _NOT_HANDLED
        if inplace:
            if not has_moments(x):
                return _NOT_HANDLED
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
    _register(*_funcs)(_make_binary_handler(_op))
_register(T.__radd__)(_make_binary_handler("add", reflected=True))
_register(T.__rsub__)(_make_binary_handler("sub", reflected=True))
_register(T.__rmul__)(_make_binary_handler("mul", reflected=True))
for _op, _funcs in {
        "add": (T.add_, T.__iadd__),
        "sub": (T.sub_, T.subtract_, T.__isub__),
        "mul": (T.mul_, T.multiply_, T.__imul__),
        "div": (T.div_, T.divide_, T.true_divide_, T.__itruediv__),
}.items():
    _register(*_funcs)(_make_binary_handler(_op, inplace=True))


@_register(torch.neg, torch.negative, T.neg, T.negative, T.__neg__)
def _neg(func, args, kwargs):
    x = args[0]
    if not has_moments(x) or kwargs:
        return _NOT_HANDLED
    with _disabled():
        return _wrap(func(*args), -x.moment_mean, x.moment_var)


# --- shape / copy ops ----------------------------------------------------------------


def _structural(func, args, kwargs):
    x = args[0] if args else None
    if not has_moments(x) or _has_any_moments(args[1:], kwargs) or "out" in kwargs:
        return _NOT_HANDLED
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
    _register(getattr(T, _name, None), getattr(torch, _name, None))(_structural)
_register(torch.clone, torch.detach, torch.flatten, torch.reshape)(_structural)


@_register(torch.cat, torch.concat, torch.concatenate, torch.stack)
def _cat(func, args, kwargs):
    tensors = args[0] if args else kwargs.get("tensors")
    if tensors is None or not all(has_moments(t) for t in tensors) or "out" in kwargs:
        return _NOT_HANDLED
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
    return _NOT_HANDLED


_register(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
          F.feature_alpha_dropout)(_dropout_handler)


# --- batch norm ----------------------------------------------------------------------


@_register(F.batch_norm)
def _batch_norm(func, args, kwargs):
    names = ("input", "running_mean", "running_var", "weight", "bias", "training",
             "momentum", "eps")
    b = dict(zip(names, args))
    b.update(kwargs)
    x = b["input"]
    if not has_moments(x) or _has_any_moments(b.get("weight"), b.get("bias")):
        return _NOT_HANDLED
    training = b.get("training", False)
    eps = b.get("eps", 1e-5)
    weight, bias = b.get("weight"), b.get("bias")
    rm, rv = b.get("running_mean"), b.get("running_var")
    with _disabled():
        data = func(*args, **kwargs)
        shape = [1, -1] + [1] * (x.dim() - 2)
        if training or rm is None or rv is None:
            dims = [d for d in range(x.dim()) if d != 1]
            mu = x.mean(dim=dims)
            var_b = x.var(dim=dims, unbiased=False)
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


def _avg_pool_handler(nd: int):
    names = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
             "divisor_override")

    def handler(func, args, kwargs):
        b = dict(zip(names, args))
        b.update(kwargs)
        x = b["input"]
        if not has_moments(x):
            return _NOT_HANDLED
        with _disabled():
            data = func(*args, **kwargs)
            mean = func(x.moment_mean, *args[1:], **kwargs)
            pooled_var = func(x.moment_var, *args[1:], **kwargs)
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


_register(F.avg_pool2d, torch._C._nn.avg_pool2d)(_avg_pool_handler(2))
_register(F.avg_pool3d, torch._C._nn.avg_pool3d)(_avg_pool_handler(3))


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
            return _NOT_HANDLED
        with _disabled():
            data = func(*args, **kwargs)
            mean = func(x.moment_mean, *args[1:], **kwargs)
            pooled_var = func(x.moment_var, *args[1:], **kwargs)
            sizes = (output_size,) * nd if isinstance(output_size, int) else tuple(output_size)
            count = torch.ones(())
            for k, (n_in, n_out) in enumerate(zip(x.shape[-nd:], sizes)):
                n_out = n_in if n_out is None else n_out
                c = _adaptive_counts(n_in, n_out)
                count = count.unsqueeze(-1) * c if k else c
            var = pooled_var / count.to(dtype=x.dtype, device=x.device)
        return _wrap(data, mean, var)
    return handler


_register(F.adaptive_avg_pool1d, torch.adaptive_avg_pool1d)(_adaptive_avg_pool_handler(1))
_register(F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d)(_adaptive_avg_pool_handler(2))
_register(F.adaptive_avg_pool3d, torch._C._nn.adaptive_avg_pool3d)(_adaptive_avg_pool_handler(3))


def _reduction_handler(kind: str):
    def handler(func, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        if not has_moments(x) or "out" in kwargs:
            return _NOT_HANDLED
        dim = args[1] if len(args) > 1 else kwargs.get("dim", None)
        keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        if len(args) > 3 or set(kwargs) - {"input", "dim", "keepdim"}:
            return _NOT_HANDLED   # dtype= etc.
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


_register(torch.mean, T.mean)(_reduction_handler("mean"))
_register(torch.sum, T.sum)(_reduction_handler("sum"))

#: the functions whose results keep the moments (for documentation and tests)
MOMENT_PRESERVING_OPS = frozenset(_HANDLERS)
