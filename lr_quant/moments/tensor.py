"""``MomentTensor``: a sample that carries its elementwise Gaussian mean and variance, and
the handler table its ``__torch_function__`` consults (see the package docstring)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from .._random import randn_as

__all__ = ["MomentTensor", "split_moments", "has_moments", "register", "HANDLERS"]

_Handler = Callable[[Callable, tuple, dict], Any]
HANDLERS: Dict[Callable, _Handler] = {}
#: a handler's answer for "not moment-preserving with these arguments"
NOT_HANDLED = object()


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
            noise = randn_as(mean, generator=generator)
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
        handler = HANDLERS.get(func)
        if handler is not None:
            out = handler(func, args, kwargs)
            if out is not NOT_HANDLED:
                return out
        return _plain_call(func, args, kwargs)


def _plain_call(func, args, kwargs):
    """Run func on the samples. A MomentTensor mutated in place loses its moments (its
    version counter moves, see MomentTensor._moments_valid)."""
    with _disabled():
        return func(*args, **kwargs)


def register(*funcs):
    def deco(handler):
        for f in funcs:
            if callable(f) and not isinstance(f, torch.dtype):
                HANDLERS[f] = handler
        return handler
    return deco


def _has_any_moments(*objs) -> bool:
    flat, _ = tree_flatten(objs)
    return any(isinstance(a, MomentTensor) for a in flat)
