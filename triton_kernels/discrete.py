"""Read a frozen layer's discrete weight: ``W[n] = scale[n] * v[n]``, v in {-1,+1} or {-1,0,+1}.

Sources, in order:
  (b) a duck-typed Brevitas quant layer: a callable ``module.quant_weight()`` whose result
      has ``.value`` (a QuantTensor) -> that value;
  (a) otherwise ``module.weight``.
The per-output-channel scale is ``max_k |W[n, k]|`` (1 for an all-zero channel); the
weight is discrete when every ``|W[n, k] - scale[n] v[n, k]| <= rtol * scale[n]``.
Binary if no entry is 0, else ternary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["NotDiscreteError", "DiscreteWeight", "layer_weight", "discretize_weight"]


class NotDiscreteError(ValueError):
    """The weight is not per-channel scale x {-1,+1} or x {-1,0,+1}."""


@dataclass(frozen=True)
class DiscreteWeight:
    """``values`` (int8, shape of the weight) times ``scale`` (float32 ``[N]``) per channel."""

    values: torch.Tensor
    scale: torch.Tensor

    @property
    def bits(self) -> int:
        """1 for binary (no zeros), 2 for ternary."""
        return 2 if bool((self.values == 0).any()) else 1


def layer_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight the layer computes with: ``quant_weight().value`` if present, else ``weight``."""
    quant_weight = getattr(module, "quant_weight", None)
    if callable(quant_weight):
        qw = quant_weight()
        value = getattr(qw, "value", qw)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{type(module).__name__}.quant_weight() returned {type(qw).__name__}, not a tensor")
        return value.detach()
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight.detach()


def discretize_weight(weight: torch.Tensor, rtol: float = 1e-5) -> DiscreteWeight:
    """Split ``weight [N, ...]`` into per-channel scale and {-1,0,+1} values, or raise."""
    if weight.dim() < 2:
        raise NotDiscreteError(f"weight must be at least 2-D [N, ...], got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise NotDiscreteError(f"weight must be floating point, got {weight.dtype}")
    w = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise NotDiscreteError("weight has non-finite entries")
    scale = w.abs().amax(dim=1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    values = torch.round(w / scale[:, None])
    err = (w - values * scale[:, None]).abs().amax(dim=1)
    if bool((err > rtol * scale).any()):
        n_bad = int((err > rtol * scale).sum())
        raise NotDiscreteError(
            f"weight is not scale x {{-1,+1}} / {{-1,0,+1}} per output channel ({n_bad} of {w.shape[0]} channels differ)"
        )
    return DiscreteWeight(values.to(torch.int8).reshape(weight.shape), scale.to(torch.float32))
