"""The interface every discrete weight distribution implements, and the helpers they share.

Moments are always computed as
    mu  = sum_k p_k v_k
    var = sum_k p_k (v_k - mu)^2
never as E[w^2] - mu^2, which cancels to negative numbers when the distribution is
nearly deterministic.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["WeightDistribution", "normalize_pretrained_weight", "check_probability_bounds",
           "DEFAULT_P_MIN", "DEFAULT_P_MAX"]

DEFAULT_P_MIN = 0.05
DEFAULT_P_MAX = 0.95


def check_probability_bounds(p_min: float, p_max: float) -> None:
    if not (0.0 < p_min < p_max < 1.0):
        raise ValueError(
            f"probability bounds must satisfy 0 < p_min < p_max < 1, got p_min={p_min}, "
            f"p_max={p_max}")


def logit(p: Tensor) -> Tensor:
    return torch.log(p) - torch.log1p(-p)


def normalize_pretrained_weight(weight: Tensor, low: float = -1.0, high: float = 1.0) -> Tensor:
    """Shayer's normalization of a pretrained weight: w = clip(W / std(W), low, high).

    std is taken over the whole tensor (per layer). Raises on non-finite or constant input.
    """
    if not torch.is_tensor(weight) or not weight.is_floating_point():
        raise TypeError(f"pretrained weight must be a floating point tensor, got {type(weight)}")
    if weight.numel() < 2:
        raise ValueError("pretrained weight needs at least 2 elements to estimate its std")
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"pretrained weight has {bad} non-finite values (NaN/inf)")
    w = weight.detach().double()
    std = w.std()
    if not std > 0:
        raise ValueError("pretrained weight is constant (std = 0): cannot normalize it")
    return (w / std).clamp(low, high)


class WeightDistribution(ABC):
    """A factorized distribution over a discrete value set, one per weight.

    Subclasses define the logits layout (`logits_shape`) and `probabilities`; the moments,
    mode, sampling and entropy follow from them. All methods accept logits of shape
    `logits_shape(weight_shape)` and return tensors of `weight_shape` (probabilities carry
    a leading value axis of size K).
    """

    name: ClassVar[str] = ""

    def __init__(self, values: Sequence[float]):
        self.values = _validate_values(values)
        magnitudes = {abs(v) for v in self.values}
        #: E[w^2] when every value has the same magnitude (then it does not depend on the
        #: probabilities: binary +-1 -> 1), else None
        self.constant_square: Optional[float] = magnitudes.pop() ** 2 if len(magnitudes) == 1 \
            else None
        # Values materialized lazily per (dtype, device).
        self._values_cache: Dict[Tuple[torch.dtype, torch.device], Tensor] = {}

    # -- description -------------------------------------------------------------------
    @property
    def num_values(self) -> int:
        return len(self.values)

    @property
    def precision(self) -> int:
        """Bits needed to store one discrete weight (larq's `precision` tag)."""
        return max(1, math.ceil(math.log2(self.num_values)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(values={self.values})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.values == other.values

    def __hash__(self) -> int:
        return hash((type(self), self.values))

    def values_tensor(self, like: Tensor) -> Tensor:
        key = (like.dtype, like.device)
        if key not in self._values_cache:
            self._values_cache[key] = torch.tensor(self.values, dtype=like.dtype, device=like.device)
        return self._values_cache[key]

    def _values_view(self, like: Tensor, ndim: int) -> Tensor:
        return self.values_tensor(like).view(-1, *([1] * ndim))

    # -- parameterization --------------------------------------------------------------
    @abstractmethod
    def logits_shape(self, weight_shape: Sequence[int]) -> Tuple[int, ...]:
        """Shape of the logits tensor that parameterizes a weight of `weight_shape`."""

    @abstractmethod
    def probabilities(self, logits: Tensor) -> Tensor:
        """p[k, ...] = P(w = v_k), shape (K, *weight_shape)."""

    def weight_shape(self, logits: Tensor) -> Tuple[int, ...]:
        return tuple(logits.shape[1:])

    def check_logits(self, logits: Tensor, weight_shape: Sequence[int]) -> None:
        expected = self.logits_shape(weight_shape)
        if tuple(logits.shape) != expected:
            raise ValueError(
                f"{self.name} logits for a weight of shape {tuple(weight_shape)} must have "
                f"shape {expected}, got {tuple(logits.shape)}")

    # -- statistics --------------------------------------------------------------------
    def moments(self, logits: Tensor) -> Tuple[Tensor, Tensor]:
        """(mean, variance) with var = sum_k p_k (v_k - mu)^2 (no cancellation)."""
        p = self.probabilities(logits)
        v = self._values_view(p, p.dim() - 1)
        mean = (p * v).sum(0)
        var = (p * (v - mean.unsqueeze(0)).square()).sum(0)
        return mean, var

    def scaled_moments(self, logits: Tensor, scale: Optional[Tensor] = None
                       ) -> Tuple[Tensor, Tensor]:
        """(mean s, var s^2) of the scaled weight s w (s broadcastable to the weight, e.g.
        per output channel; None: s = 1). Binary and ternary fuse it (fewer saved tensors)."""
        mean, var = self.moments(logits)
        if scale is None:
            return mean, var
        return mean * scale, var * (scale * scale)

    def mean(self, logits: Tensor) -> Tensor:
        return self.moments(logits)[0]

    def variance(self, logits: Tensor) -> Tensor:
        return self.moments(logits)[1]

    def log_probabilities(self, logits: Tensor) -> Tensor:
        """log p[k, ...], computed without forming p where the parameterization allows."""
        p = self.probabilities(logits)
        return torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))

    @abstractmethod
    def logits_from_log_probabilities(self, log_p: Tensor) -> Tensor:
        """Logits of the distribution p_k = exp(log_p[k]) / sum_j exp(log_p[j]) (log_p may
        be unnormalized: every parameterization here ignores a common additive constant)."""

    def sharpen(self, logits: Tensor, gain: float) -> Tensor:
        """Logits of the tempered distribution p_k^g / sum_j p_j^g, g = `gain` > 0.

        Same mode; lower entropy for g > 1 (dH/dg = -g Var(log p) under the tempered
        distribution); g -> inf: deterministic at the mode. Binary: sigmoid(g theta); ternary
        recomputes both logits, since scaling Shayer's two logits directly can move the mode.
        """
        if not gain > 0:
            raise ValueError(f"sharpening gain must be > 0, got {gain}")
        return self._tempered_logits(logits, gain)

    def _tempered_logits(self, logits: Tensor, gain: float) -> Tensor:
        return self.logits_from_log_probabilities(gain * self.log_probabilities(logits))

    def mode(self, logits: Tensor) -> Tensor:
        """Most probable value of each weight (ties resolve to the smaller value)."""
        p = self.probabilities(logits)
        return self.values_tensor(p)[p.argmax(0)]

    def sample(self, logits: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """One discrete weight tensor drawn from the distribution (inverse CDF)."""
        p = self.probabilities(logits).detach()
        u = torch.rand(p.shape[1:], generator=generator, dtype=p.dtype, device=p.device)
        cdf = p.cumsum(0)
        index = (u.unsqueeze(0) > cdf).sum(0).clamp_(max=self.num_values - 1)
        return self.values_tensor(p)[index]

    def entropy(self, logits: Tensor) -> Tensor:
        """Per-weight entropy H = -sum_k p_k log p_k (nats)."""
        p = self.probabilities(logits)
        return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(0)

    @abstractmethod
    def regularizer(self, logits: Tensor) -> Tensor:
        """Scalar penalty that pushes the distribution toward determinism / small logits."""

    # -- initialization ----------------------------------------------------------------
    @abstractmethod
    def init_logits(
            self,
            weight: Tensor,
            p_min: float = DEFAULT_P_MIN,
            p_max: float = DEFAULT_P_MAX) -> Tensor:
        """Logits whose mean follows a pretrained weight (Shayer et al. 2018, sec. 3.3)."""

    def init_logits_from_scratch(
            self,
            weight_shape: Sequence[int],
            generator: Optional[torch.Generator] = None,
            p_min: float = DEFAULT_P_MIN,
            p_max: float = DEFAULT_P_MAX) -> Tensor:
        """Logits for training from scratch: the pretrained init applied to a Gaussian draw."""
        weight = torch.randn(tuple(weight_shape), generator=generator, dtype=torch.float64)
        return self.init_logits(weight, p_min, p_max)


def _validate_values(values: Sequence[float]) -> Tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"value set must be a sequence of numbers, got {values!r}") from e
    if len(vals) < 2:
        raise ValueError(f"value set needs at least 2 values, got {vals}")
    if len(vals) > 256:
        raise ValueError(f"value set has {len(vals)} values; at most 256 are supported")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"value set must be finite, got {vals}")
    if len(set(vals)) != len(vals):
        raise ValueError(f"value set has duplicate values: {vals}")
    if list(vals) != sorted(vals):
        raise ValueError(f"value set must be sorted in increasing order, got {vals}")
    return vals
