"""Regional ``torch.compile`` of LR training: each LR layer's and stochastic quantizer's
training math (weight moments, the two convolutions, the Gaussian sample; the sign's
probabilities, moments and sample) is one compiled region, so Inductor fuses the elementwise
chains around the convolutions (vectorized C++ on CPU, Triton on GPU) in the forward and the
backward. What stays outside (MomentTensor wrapping and the moment propagation through
BatchNorm and pooling, Brevitas' quantizers in eval) runs eagerly.

A module opts in through its ``lr_compile`` attribute (:func:`set_compile`); the compiled
function is one per method and device type, shared by all modules (Dynamo guards and
recompiles per layer geometry and input shape); on CPU the regions keep PyTorch's NCHW layout
(:data:`DEVICE_INDUCTOR_OPTIONS`). The regions draw their noise from torch's generator
(:data:`INDUCTOR_OPTIONS`), so at one seed they give eager's numbers up to rounding.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import nn

__all__ = ["set_compile", "compiled", "inductor_options", "MIN_RECOMPILE_LIMIT",
           "INDUCTOR_OPTIONS", "DEVICE_INDUCTOR_OPTIONS"]

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
#: On CPU (oneDNN) Inductor turns every graph with a convolution channels_last
#: (``layout_optimization``); a region between eager NCHW code then converts its inputs,
#: the tensors it saves and its gradients at every boundary. resnet18 LR W1 at 112x112,
#: batch 16, 1 thread, compiled regions: 2.39 s per step with it, 2.20 s without (eager
#: FP 1.07-1.10 s in the same runs), training memory 1.92x -> 1.79x FP (docs/benchmarks.md).
#: Other devices keep Inductor's heuristic (not measured there).
DEVICE_INDUCTOR_OPTIONS = {"cpu": {"layout_optimization": False}}
_COMPILED: Dict[Tuple[Callable, str], Callable] = {}


def inductor_options(device_type: str) -> Dict[str, object]:
    """The Inductor options of the regions compiled for tensors on `device_type`."""
    return {**INDUCTOR_OPTIONS, **DEVICE_INDUCTOR_OPTIONS.get(device_type, {})}


def compiled(fn: Callable, device_type: str = "cpu") -> Callable:
    """The process-wide ``torch.compile`` of the function `fn` for tensors on `device_type`
    (made on first use)."""
    key = (fn, device_type)
    out = _COMPILED.get(key)
    if out is None:
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, MIN_RECOMPILE_LIMIT)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit,
                                                 8 * MIN_RECOMPILE_LIMIT)
        out = _COMPILED[key] = torch.compile(fn, options=inductor_options(device_type))
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
