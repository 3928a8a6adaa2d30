"""Binary weights {-1, +1} (Shayer et al., ICLR 2018)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .base import DEFAULT_P_MAX, DEFAULT_P_MIN, WeightDistribution, check_probability_bounds, \
    logit, normalize_pretrained_weight
from .fused_moments import BinaryMoments

__all__ = ["BinaryDistribution"]


class BinaryDistribution(WeightDistribution):
    """w in {-1, +1} with P(w = +1) = sigmoid(theta) (Shayer et al. 2018).

    mu = tanh(theta / 2) = 2p - 1,  var = 4 p (1 - p) = 1 - mu^2,
    regularizer ("beta"): sum p (1 - p).
    The logits have the weight's shape.
    """

    name = "binary"

    def __init__(self, values: Sequence[float] = (-1.0, 1.0)):
        super().__init__(values)
        if self.values != (-1.0, 1.0):
            raise ValueError(
                f"binary distribution is over (-1, +1), got {self.values}; use "
                f"'categorical' for other value sets")

    def logits_shape(self, weight_shape):
        return tuple(weight_shape)

    def weight_shape(self, logits):
        return tuple(logits.shape)

    def probabilities(self, logits):
        return torch.stack([torch.sigmoid(-logits), torch.sigmoid(logits)])

    def log_probabilities(self, logits):
        return torch.stack([F.logsigmoid(-logits), F.logsigmoid(logits)])

    def logits_from_log_probabilities(self, log_p):
        return log_p[1] - log_p[0]

    def _tempered_logits(self, logits, gain):
        return logits * gain   # p^g / (p^g + (1-p)^g) = sigmoid(g theta)

    def moments(self, logits):
        return BinaryMoments.moments(logits)

    def scaled_moments(self, logits, scale=None):
        return BinaryMoments.moments(logits, scale)

    def mode(self, logits):
        one = torch.ones((), dtype=logits.dtype, device=logits.device)
        return torch.where(logits >= 0, one, -one)

    def sample(self, logits, generator=None):
        p = torch.sigmoid(logits.detach())
        u = torch.rand(p.shape, generator=generator, dtype=p.dtype, device=p.device)
        one = torch.ones((), dtype=p.dtype, device=p.device)
        return torch.where(u < p, one, -one)

    def entropy(self, logits):
        # H = softplus(-t) + softplus(t) - ... written stably: H = softplus(t) - t * sigmoid(t)
        return F.softplus(logits) - logits * torch.sigmoid(logits)

    def regularizer(self, logits):
        p = torch.sigmoid(logits)
        return (p * (1.0 - p)).sum()

    def init_logits(self, weight, p_min=DEFAULT_P_MIN, p_max=DEFAULT_P_MAX):
        check_probability_bounds(p_min, p_max)
        w = normalize_pretrained_weight(weight)
        p = (0.5 * (1.0 + w)).clamp(p_min, p_max)
        return logit(p).to(weight.dtype)
