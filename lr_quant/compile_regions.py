"""Regional ``torch.compile`` of LR training: each LR layer's and stochastic quantizer's
training math (weight moments, the two convolutions, the Gaussian sample; the sign's
probabilities, moments and sample) is one compiled region, so Inductor fuses the elementwise
chains around the convolutions (vectorized C++ on CPU, Triton on GPU) in the forward and the
backward. What stays outside (MomentTensor wrapping and the moment propagation through
BatchNorm and pooling, Brevitas' quantizers in eval) runs eagerly.

A module opts in through its ``lr_compile`` attribute (:func:`set_compile`); the compiled
function is one per method, shared by all modules (Dynamo guards and recompiles per layer
geometry and input shape). The regions draw their noise from torch's generator
(:data:`INDUCTOR_OPTIONS`), so at one seed they give eager's numbers up to rounding.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn

__all__ = ["set_compile", "compiled", "MIN_RECOMPILE_LIMIT", "INDUCTOR_OPTIONS"]

#: Dynamo's per-function recompile limit is raised to at least this: one compiled region
#: serves every layer, and a network has more geometries than the default 8.
MIN_RECOMPILE_LIMIT = 128
#: Inductor's own random numbers (Philox, a scalar loop on CPU) made the compiled LR layer
#: slower than eager: the partitioner recomputes the noise in the backward. With
#: ``fallback_random`` the regions draw with torch's generator (the noise is saved, as in
#: eager) and give eager's numbers at the same seed. One 64->64 3x3 LR conv at 56x56,
#: batch 16, forward + backward, 1 CPU thread (``python -m benchmarks.probes``): eager
#: 343 ms, Inductor random 538 ms, fallback_random 417 ms (FP conv 167 ms).
INDUCTOR_OPTIONS = {"fallback_random": True}
_COMPILED: Dict[Callable, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """The process-wide ``torch.compile`` of the function `fn` (made on first use)."""
    out = _COMPILED.get(fn)
    if out is None:
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, MIN_RECOMPILE_LIMIT)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit,
                                                 8 * MIN_RECOMPILE_LIMIT)
        out = _COMPILED[fn] = torch.compile(fn, options=INDUCTOR_OPTIONS)
    return out


def set_compile(model: nn.Module, enabled: bool = True) -> int:
    """Switch the compiled training path of every LR layer and stochastic quantizer in
    `model` on (or off); returns how many modules it switched."""
    count = 0
    for module in model.modules():
        if hasattr(type(module), "lr_compile"):
            module.lr_compile = bool(enabled)
            count += 1
    return count
