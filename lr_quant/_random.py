"""Random draws shaped like a tensor, with an optional ``torch.Generator``.

``torch.randn(shape, generator=None, ...)`` stops ``torch.compile`` (Dynamo cannot trace the
explicit ``generator=None`` with symbolic shapes); ``torch.randn_like`` traces and draws the
same numbers from the default generator. A caller's own generator keeps the explicit form
(what makes a draw reproducible independently of the global seed).

``randn_replayable`` also returns a function that draws the same numbers again from the
generator state recorded before the draw (a few kB on CPU, 16 bytes on CUDA): an autograd
node can keep that instead of an activation-sized noise tensor (the way
``torch.utils.checkpoint`` replays dropout)."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["randn_as", "rand_as", "randn_replayable"]


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


def _default_generator(device: torch.device) -> Optional[torch.Generator]:
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[
            device.index if device.index is not None else torch.cuda.current_device()]
    return None


def randn_replayable(like: Tensor, dtype: Optional[torch.dtype] = None,
                     generator: Optional[torch.Generator] = None
                     ) -> Tuple[Tensor, Optional[Callable[[], Tensor]]]:
    """``(randn_as(like, dtype, generator), replay)``: ``replay()`` returns the same values
    again (a fresh generator set to the state recorded before the draw; the caller's and the
    global generators are not touched). ``replay`` is None where a state cannot be recorded
    (inside torch.compile, during CUDA graph capture, devices other than CPU and CUDA): keep
    the tensor there."""
    device = like.device
    source = generator if generator is not None else _default_generator(device)
    if (source is None or torch.compiler.is_compiling() or
            (device.type == "cuda" and torch.cuda.is_current_stream_capturing())):
        return randn_as(like, dtype, generator), None
    state = source.get_state()
    noise = randn_as(like, dtype, generator)
    shape, dtype = noise.shape, noise.dtype

    def replay() -> Tensor:
        again = torch.Generator(device=device)
        again.set_state(state)
        return torch.randn(shape, generator=again, dtype=dtype, device=device)

    return noise, replay
