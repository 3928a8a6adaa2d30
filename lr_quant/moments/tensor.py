"""``MomentTensor``: a sample that carries its elementwise Gaussian mean and variance, and
the handler tables its ``__torch_function__`` consults (see the package docstring)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from .._random import randn_as

__all__ = ["MomentTensor", "split_moments", "has_moments", "register", "register_deferred",
           "HANDLERS", "DEFERRED_RULES"]

_Handler = Callable[[Callable, tuple, dict], Any]
HANDLERS: Dict[Callable, _Handler] = {}
#: a handler's answer for "not moment-preserving with these arguments"
NOT_HANDLED = object()
#: ops a *deferred* MomentTensor goes through without drawing its sample:
#: func -> (rule(func, args, kwargs) -> (mean, var) or None, in place?)
_Rule = Callable[[Callable, tuple, dict], Optional[Tuple[Tensor, Tensor]]]
DEFERRED_RULES: Dict[Callable, Tuple[_Rule, bool]] = {}
#: metadata reads a deferred MomentTensor answers from its placeholder (no sample needed)
_METADATA = frozenset(f for f in (
    Tensor.dim, Tensor.ndimension, Tensor.size, Tensor.numel, Tensor.nelement, Tensor.stride,
    Tensor.is_contiguous, Tensor.is_floating_point, Tensor.is_complex, Tensor.element_size,
    Tensor.get_device, Tensor.__len__, Tensor.shape.__get__, Tensor.ndim.__get__,
    Tensor.dtype.__get__, Tensor.device.__get__, Tensor.layout.__get__,
    Tensor.is_cuda.__get__, Tensor.is_meta.__get__, Tensor.is_sparse.__get__,
    Tensor.is_quantized.__get__, Tensor.is_nested.__get__, torch.is_floating_point,
    torch.numel) if f is not None)
_REQUIRES_GRAD = Tensor.requires_grad.__get__


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
    #: eps of the sample sqrt(var + eps) not drawn yet (see :meth:`deferred`); None: drawn
    _deferred_eps: Optional[float] = None

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

    @classmethod
    def deferred(cls, mean: Tensor, var: Tensor, eps: float = 0.0) -> "MomentTensor":
        """The moments N(mean, var) with the sample not drawn yet (an LR layer's output in
        training; its ``eps`` is the layer's, sample = mean + sqrt(var + eps) e).

        Ops in :data:`DEFERRED_RULES` (affine arithmetic, BatchNorm) map the moments and
        return deferred results: the sample, its noise and their passes are skipped where
        only moments are read (an LR layer, a stochastic sign). The first op that reads the
        data draws it in place (:meth:`materialize_`): every reader of this tensor sees one
        sample. The data is an uninitialized placeholder until then. No validation (hot
        path): var >= 0 and equal shapes are the producer's guarantee."""
        with _disabled():
            placeholder = torch.empty_like(mean, memory_format=torch.contiguous_format)
            out = placeholder.as_subclass(cls)
        out._set_moments(mean, var)
        out._deferred_eps = float(eps)
        return out

    @property
    def is_deferred(self) -> bool:
        """True while the sample is not drawn (see :meth:`deferred`)."""
        return self._deferred_eps is not None

    def materialize_(self) -> "MomentTensor":
        """Draw the sample of a deferred MomentTensor into its data, in place (autograd
        connects it to the moments); no-op for a drawn one."""
        if self._deferred_eps is None:
            return self
        from ..functional.local_reparam import lr_sample   # math layer; avoids an import cycle
        mean, var, eps = self._mm, self._mv, self._deferred_eps
        self._deferred_eps = None
        sample = lr_sample(mean, var, eps)
        with _disabled():
            self.copy_(sample)
        self._set_moments(mean, var)
        return self

    @property
    def has_moments(self) -> bool:
        return has_moments(self)

    def plain(self) -> Tensor:
        """The sample as a plain tensor (autograd-connected alias; drawn if deferred)."""
        self.materialize_()
        with _disabled():
            return self.as_subclass(Tensor)

    def __repr__(self, *, tensor_contents=None):  # noqa: D105
        if self.is_deferred:
            with _disabled():
                return (f"MomentTensor(deferred, shape={tuple(self.shape)}, "
                        f"mean={self._mm!r}, var={self._mv!r})")
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
        flat, _ = tree_flatten((args, kwargs))
        deferred = [a for a in flat if _is_deferred(a)]
        if deferred:
            out = _deferred_call(func, args, kwargs, deferred, flat)
            if out is not NOT_HANDLED:
                return out
            for t in deferred:    # the op reads the data: draw it (in place, once)
                t.materialize_()
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


def _is_deferred(x) -> bool:
    return isinstance(x, MomentTensor) and x._deferred_eps is not None


def _deferred_call(func, args, kwargs, deferred: List["MomentTensor"], flat: list):
    """The op on deferred MomentTensors without drawing a sample, or NOT_HANDLED."""
    if func in _METADATA or (func is Tensor.type_as and not _is_deferred(args[0])):
        return _plain_call(func, args, kwargs)   # reads shape / dtype / device only
    if func == _REQUIRES_GRAD:   # a method-wrapper: equal, not identical, per access
        x = args[0]
        return x._mm.requires_grad or x._mv.requires_grad
    entry = DEFERRED_RULES.get(func)
    if entry is None:
        return NOT_HANDLED
    if sum(has_moments(a) for a in flat) != len(deferred):
        return NOT_HANDLED   # a drawn MomentTensor among them: draw all (one kind of data)
    rule, inplace = entry
    moments = rule(func, args, kwargs)
    if moments is None:
        return NOT_HANDLED
    mean, var = moments
    shape = torch.broadcast_shapes(mean.shape, var.shape)
    if mean.shape != var.shape:
        with _disabled():
            mean, var = mean.expand(shape), var.expand(shape)
    if inplace:
        x = args[0]
        if not _is_deferred(x) or tuple(shape) != tuple(x.shape):
            return NOT_HANDLED
        x._set_moments(mean, var)
        return x
    return MomentTensor.deferred(mean, var, max(t._deferred_eps for t in deferred))


def register_deferred(*funcs, inplace: bool = False):
    """Register ``rule(func, args, kwargs) -> (mean, var) or None`` for deferred inputs."""
    def deco(rule):
        for f in funcs:
            if callable(f) and not isinstance(f, torch.dtype):
                DEFERRED_RULES[f] = (rule, inplace)
        return rule
    return deco


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
