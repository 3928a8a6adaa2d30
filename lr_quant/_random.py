"""Random draws shaped like a tensor, with an optional ``torch.Generator``.

``torch.randn(shape, generator=None, ...)`` stops ``torch.compile`` (Dynamo cannot trace the
explicit ``generator=None`` with symbolic shapes); ``torch.randn_like`` traces and draws the
same numbers from the default generator. A caller's own generator keeps the explicit form
(what makes a draw reproducible independently of the global seed)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["randn_as", "rand_as"]


def _draw(like_fn, shaped_fn, like: Tensor, dtype: Optional[torch.dtype],
          generator: Optional[torch.Generator]) -> Tensor:
    dtype = like.dtype if dtype is None else dtype
    if generator is None:
        return like_fn(like, dtype=dtype, memory_format=torch.contiguous_format)
    return shaped_fn(like.shape, generator=generator, dtype=dtype, device=like.device)


def randn_as(like: Tensor, dtype: Optional[torch.dtype] = None,
             generator: Optional[torch.Generator] = None) -> Tensor:
    """N(0, 1) draws of `like`'s shape and device (`dtype`, default `like`'s)."""
    return _draw(torch.randn_like, torch.randn, like, dtype, generator)


def rand_as(like: Tensor, dtype: Optional[torch.dtype] = None,
            generator: Optional[torch.Generator] = None) -> Tensor:
    """U[0, 1) draws of `like`'s shape and device (`dtype`, default `like`'s)."""
    return _draw(torch.rand_like, torch.rand, like, dtype, generator)
