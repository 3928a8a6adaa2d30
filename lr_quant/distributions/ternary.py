"""Ternary weights {-1, 0, +1} with Shayer's two sigmoids (Shayer et al., ICLR 2018)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .base import DEFAULT_P_MAX, DEFAULT_P_MIN, WeightDistribution, check_probability_bounds, \
    logit, normalize_pretrained_weight
from .fused_moments import TernaryMoments

__all__ = ["TernaryDistribution"]


class TernaryDistribution(WeightDistribution):
    """w in {-1, 0, +1} with Shayer's two sigmoids (Shayer et al. 2018).

    logits[0] = a, logits[1] = b:  P(w = 0) = sigmoid(a),  P(w = +1 | w != 0) = sigmoid(b).
    mu = (1 - p0)(2q - 1); regularizer ("probability decay"): L2 on the logits.
    Init: p0 = p_max - (p_max - p_min)|w|, q = clip(0.5 (1 + w / (1 - p0)), p_min, p_max),
    so that mu = w wherever the clip on q is inactive.
    """

    name = "ternary"

    def __init__(self, values: Sequence[float] = (-1.0, 0.0, 1.0)):
        super().__init__(values)
        if self.values != (-1.0, 0.0, 1.0):
            raise ValueError(
                f"ternary distribution is over (-1, 0, +1), got {self.values}; use "
                f"'categorical' for other value sets")

    def logits_shape(self, weight_shape):
        return (2, *weight_shape)

    def probabilities(self, logits):
        a, b = logits[0], logits[1]
        p_zero = torch.sigmoid(a)
        p_nonzero = torch.sigmoid(-a)
        return torch.stack([p_nonzero * torch.sigmoid(-b), p_zero, p_nonzero * torch.sigmoid(b)])

    def log_probabilities(self, logits):
        a, b = logits[0], logits[1]
        log_nonzero = F.logsigmoid(-a)
        return torch.stack([log_nonzero + F.logsigmoid(-b), F.logsigmoid(a),
                            log_nonzero + F.logsigmoid(b)])

    def logits_from_log_probabilities(self, log_p):
        # a = log p0 - log(p- + p+), b = log p+ - log p-
        return torch.stack([log_p[1] - torch.logaddexp(log_p[0], log_p[2]), log_p[2] - log_p[0]])

    def moments(self, logits):
        return TernaryMoments.moments(logits)

    def scaled_moments(self, logits, scale=None):
        return TernaryMoments.moments(logits, scale)

    def regularizer(self, logits):
        return logits.square().sum()

    def init_logits(self, weight, p_min=DEFAULT_P_MIN, p_max=DEFAULT_P_MAX):
        check_probability_bounds(p_min, p_max)
        w = normalize_pretrained_weight(weight)
        p_zero = p_max - (p_max - p_min) * w.abs()
        q = (0.5 * (1.0 + w / (1.0 - p_zero))).clamp(p_min, p_max)
        return torch.stack([logit(p_zero), logit(q)]).to(weight.dtype)
