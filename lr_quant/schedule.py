"""Scalar schedules over training steps (sign temperature, noise, sharpness, ...)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ParamSchedule"]


@dataclass(frozen=True)
class ParamSchedule:
    """A scalar going from ``start`` to ``end`` over ``steps`` steps, then staying at end.

    kind: "constant" (start), "linear", "cosine" (half cosine) or "exponential" (geometric;
    start and end > 0). ``schedule(step)`` returns the value.
    """
    start: float
    end: float
    steps: int
    kind: str = "linear"

    KINDS = ("constant", "linear", "cosine", "exponential")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"schedule kind must be one of {self.KINDS}, got {self.kind!r}")
        if int(self.steps) < 1:
            raise ValueError(f"schedule steps must be >= 1, got {self.steps}")
        if not (math.isfinite(self.start) and math.isfinite(self.end)):
            raise ValueError("schedule start and end must be finite")
        if self.kind == "exponential" and (self.start <= 0 or self.end <= 0):
            raise ValueError("exponential schedule needs start > 0 and end > 0")

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        r = min(step, self.steps) / self.steps
        if self.kind == "constant":
            return float(self.start)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * r
        if self.kind == "cosine":
            return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * r))
        return self.start * (self.end / self.start) ** r
