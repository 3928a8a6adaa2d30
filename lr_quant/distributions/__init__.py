"""Discrete weight distributions for LR-nets.

Every weight w of an LR layer is an independent discrete random variable over a small,
sorted value set v_1 < ... < v_K, parameterized by unconstrained real logits. This package
holds only the math (no Brevitas): probabilities, moments, mode, sampling, entropy,
regularizers and the initialization from a pretrained full-precision weight.

Modules: ``base`` (the WeightDistribution interface: moments as sum_k p_k (v_k - mu)^2,
mode, sampling, entropy, sharpening, init), ``fused_moments`` (binary / ternary moments as
one autograd node each), ``binary``, ``ternary``, ``categorical``; the registry is here.

Distributions are found by name through a small registry (larq-style)::

    get_distribution("binary")
    get_distribution("ternary")
    get_distribution("categorical", values=(-2, -1, 0, 1, 2))

# References
- Shayer, Levi, Fetaya. "Learning Discrete Weights Using the Local Reparameterization
  Trick". ICLR 2018. (binary and ternary parameterization, initialization, regularizers)
- Roth, Schindler, Fröning, Pernkopf. "Training Discrete-Valued Neural Networks with
  Sign Activations Using Weight Distributions". ECML-PKDD 2019. (softmax over any value set)
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple, Union

from .base import (DEFAULT_P_MAX, DEFAULT_P_MIN, WeightDistribution, check_probability_bounds,
                   normalize_pretrained_weight)
from .binary import BinaryDistribution
from .categorical import CategoricalDistribution
from .ternary import TernaryDistribution

__all__ = [
    "WeightDistribution",
    "BinaryDistribution",
    "TernaryDistribution",
    "CategoricalDistribution",
    "register_distribution",
    "get_distribution",
    "available_distributions",
    "normalize_pretrained_weight",
    "check_probability_bounds",
    "DEFAULT_P_MIN",
    "DEFAULT_P_MAX",
]

_REGISTRY: Dict[str, Callable[..., WeightDistribution]] = {}


def register_distribution(name: str, factory: Callable[..., WeightDistribution]) -> None:
    """Register a distribution factory under a string name (larq-style alias)."""
    if name in _REGISTRY:
        raise ValueError(f"distribution {name!r} is already registered")
    _REGISTRY[name] = factory


def available_distributions() -> Tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_distribution(
        spec: Union[str, WeightDistribution, dict, None], **kwargs) -> WeightDistribution:
    """Resolve a distribution from a name, a dict {"name": ..., **kwargs} or an instance."""
    if isinstance(spec, WeightDistribution):
        if kwargs:
            raise TypeError("keyword arguments are only accepted with a distribution name")
        return spec
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("name", None)
        return get_distribution(name, **spec, **kwargs)
    if not isinstance(spec, str):
        raise TypeError(
            f"distribution must be a name, a dict or a WeightDistribution, got {spec!r}")
    if spec not in _REGISTRY:
        raise ValueError(
            f"unknown weight distribution {spec!r}; choose one of {available_distributions()}")
    try:
        return _REGISTRY[spec](**kwargs)
    except TypeError as e:
        raise TypeError(f"bad arguments for distribution {spec!r}: {e}") from e


register_distribution("binary", BinaryDistribution)
register_distribution("ternary", TernaryDistribution)
register_distribution("categorical", CategoricalDistribution)
