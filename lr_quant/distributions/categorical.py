"""Weights on any sorted value set with a softmax over the values (Roth et al., 2019)."""

from __future__ import annotations

import torch

from .base import DEFAULT_P_MAX, DEFAULT_P_MIN, WeightDistribution, check_probability_bounds, \
    normalize_pretrained_weight

__all__ = ["CategoricalDistribution"]


class CategoricalDistribution(WeightDistribution):
    """w in any sorted value set, P(w = v_k) = softmax(logits)_k (Roth et al. 2019).

    The logits carry a leading axis of size K. Regularizer: L2 on the logits.
    Init from a pretrained weight: w = clip(W / std(W), v_1, v_K); the mass (1 - K p_min)
    is split between the two values that bracket w' = (w - K p_min vbar) / (1 - K p_min)
    (linear interpolation) and every value gets the floor p_min, so mu = w exactly where
    no clip is active.
    """

    name = "categorical"

    def logits_shape(self, weight_shape):
        return (self.num_values, *weight_shape)

    def probabilities(self, logits):
        return torch.softmax(logits, dim=0)

    def log_probabilities(self, logits):
        return torch.log_softmax(logits, dim=0)

    def logits_from_log_probabilities(self, log_p):
        return log_p - log_p.mean(0, keepdim=True)

    def regularizer(self, logits):
        return logits.square().sum()

    def init_logits(self, weight, p_min=DEFAULT_P_MIN, p_max=DEFAULT_P_MAX):
        check_probability_bounds(p_min, p_max)
        k = self.num_values
        if k * p_min >= 1.0:
            raise ValueError(
                f"p_min={p_min} is too large for {k} values (needs {k} * p_min < 1)")
        v = torch.tensor(self.values, dtype=torch.float64)
        w = normalize_pretrained_weight(weight, self.values[0], self.values[-1])
        target = ((w - k * p_min * v.mean()) / (1.0 - k * p_min)).clamp(v[0], v[-1])
        upper = torch.searchsorted(v, target.contiguous(), right=False).clamp(1, k - 1)
        lower = upper - 1
        frac = (target - v[lower]) / (v[upper] - v[lower])
        p = torch.full((k, *w.shape), p_min, dtype=torch.float64)
        p.scatter_add_(0, lower.unsqueeze(0), ((1.0 - k * p_min) * (1.0 - frac)).unsqueeze(0))
        p.scatter_add_(0, upper.unsqueeze(0), ((1.0 - k * p_min) * frac).unsqueeze(0))
        return torch.log(p).to(weight.dtype)
