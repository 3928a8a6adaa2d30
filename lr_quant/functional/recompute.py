"""Recompute, instead of keep, tensors that autograd would save for the backward pass.

The LR variance path computes op(x^2, Var[w]); autograd keeps x^2 (activation-sized) for
the weight gradient, although x, which the mean path op(x, E[w]) keeps anyway, rebuilds it
with one multiply. :func:`recompute_saved` is a ``saved_tensors_hooks`` context: a tensor
autograd saves that shares storage with one of the registered tensors is kept as a recipe
(which tensor, and the view autograd saved: size, stride, offset) and rebuilt by the
registered function when the backward unpacks it, bit for bit the same values. Every other
saved tensor goes to the enclosing hooks, if any (e.g. a memory measurement), else is kept.
(The weight moments E[w] s, Var[w] s^2 could go the same way, 2 x 45 MB per resnet18 step,
but rebuilding them cost 8-21 % of a CPU W1 step when measured: not done; issue 14.)

Inside ``torch.compile`` the hooks do not reach the compiled graph's saved tensors;
``lr_moments`` wraps the square in ``torch.utils.checkpoint`` there, so that Inductor's
partitioner recomputes it as well.

First-order gradients only: a rebuilt tensor carries no autograd history, so a double
backward (``create_graph=True``) through it would miss that part.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["recompute_saved"]


class _Recipe:
    __slots__ = ("index", "size", "stride", "offset")

    def __init__(self, index: int, t: Tensor):
        self.index, self.size, self.stride = index, t.size(), t.stride()
        self.offset = t.storage_offset()


@contextmanager
def recompute_saved(tensors: Sequence[Tensor],
                    rebuild: Callable[[], Tuple[Tensor, ...]]) -> Iterator[None]:
    """Inside the context, autograd keeps a recipe instead of any saved tensor whose storage
    is that of ``tensors[i]``; the backward calls ``rebuild()`` (under no_grad, at most once)
    and takes its i-th result, which must equal ``tensors[i]``."""
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    storages = {t.untyped_storage().data_ptr(): i for i, t in enumerate(tensors)}
    layouts = [(t.size(), t.stride(), t.storage_offset(), t.dtype) for t in tensors]
    cache: Dict[str, Tuple[Tensor, ...]] = {}

    def pack(t: Tensor):
        try:
            index = storages.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):   # a tensor without a storage
            index = None
        if index is not None:
            return _Recipe(index, t)
        return ("outer", outer[0](t)) if outer is not None else t

    def unpack(packed):
        if isinstance(packed, _Recipe):
            if "values" not in cache:
                with torch.no_grad():
                    values = tuple(rebuild())
                got = [(v.size(), v.stride(), v.storage_offset(), v.dtype) for v in values]
                if got != layouts:
                    raise RuntimeError(f"recompute_saved: rebuilt tensors {got} differ in "
                                       f"layout from the saved ones {layouts}")
                cache["values"] = values
            full = cache["values"][packed.index]
            return full.as_strided(packed.size, packed.stride, packed.offset)
        if isinstance(packed, tuple) and len(packed) == 2 and packed[0] == "outer":
            return outer[1](packed[1])
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
