"""Set the stochastic activations' options on every quantizer of a model (the trainer's
schedules call these each step)."""

from __future__ import annotations

from typing import Iterator

from torch import nn

from .activation import StochasticActQuant

__all__ = ["sign_quant_modules", "set_sign_temperature", "set_sign_noise_std"]


def sign_quant_modules(model: nn.Module) -> Iterator[StochasticActQuant]:
    """Every stochastic (binary or ternary) activation quantizer inside model."""
    return (m for m in model.modules() if isinstance(m, StochasticActQuant))


def set_sign_temperature(model: nn.Module, tau: float) -> int:
    """Set tau on every stochastic activation of model; returns how many were set."""
    return _set_on_signs(model, StochasticActQuant.set_temperature, tau)


def set_sign_noise_std(model: nn.Module, sigma: float) -> int:
    """Set sigma_a on every stochastic activation of model; returns how many were set."""
    return _set_on_signs(model, StochasticActQuant.set_noise_std, sigma)


def _set_on_signs(model: nn.Module, setter, value: float) -> int:
    signs = list(sign_quant_modules(model))
    for m in signs:
        setter(m, value)
    return len(signs)
