"""The plain tensor of a module output: ``as_tensor(x)`` is ``x.value`` for a Brevitas
``QuantTensor`` (or anything else carrying a ``.value`` tensor) and ``x`` itself otherwise.
Duck-typed, so it imports nothing from Brevitas."""

from __future__ import annotations

__all__ = ["as_tensor"]


def as_tensor(x):
    return getattr(x, "value", x)
