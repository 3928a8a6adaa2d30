"""The plain tensor of a module output: ``as_tensor(x)`` is ``x.value`` for a Brevitas
``QuantTensor`` (or anything else carrying a ``.value`` tensor) and ``x`` itself otherwise;
``as_tensor(x, strict=True)`` also takes a tuple output's first tensor and gives None when
there is no tensor. Duck-typed, so it imports nothing from Brevitas."""

from __future__ import annotations

import torch

__all__ = ["as_tensor"]


def as_tensor(x, strict: bool = False):
    """``x.value`` when `x` has one, else `x`.

    With ``strict=True`` the result is a ``torch.Tensor`` or None: a tensor is returned
    as it is, a ``.value`` tensor unwrapped, a tuple / list output gives its first
    element's tensor, anything else None.
    """
    if not strict:
        return getattr(x, "value", x)
    if isinstance(x, torch.Tensor):
        return x
    value = getattr(x, "value", None)
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(x, (tuple, list)) and x:
        return as_tensor(x[0], strict=True)
    return None
