"""Shared pieces of the benchmarks: the compared methods as recipe dicts, timing helpers."""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

# method -> (weight quantizer for dense convs / linear, for depthwise, activation quantizer)
# LR W1 on depthwise-separable nets follows recipes/mobilenet_w1.yaml (ternary depthwise);
# the STE analogue uses Brevitas ternary there.
METHODS: Dict[str, dict] = {
    "fp": dict(label="FP32", weights=None, depthwise=None, act=None),
    "lr_w1": dict(label="LR W1", weights="lr_binary_per_channel",
                  depthwise="lr_binary_per_channel", act=None),
    "lr_w2": dict(label="LR W2 (ternary)", weights="lr_ternary_per_channel",
                  depthwise="lr_ternary_per_channel", act=None),
    "lr_w1a1": dict(label="LR W1A1", weights="lr_binary_per_channel",
                    depthwise="lr_binary_per_channel", act="stochastic_sign"),
    # the same models as lr_w1 / lr_w1a1 with the compiled training path
    # (lr_quant.set_compile, recipe option train.compile)
    "lr_w1_compiled": dict(label="LR W1 compiled", weights="lr_binary_per_channel",
                           depthwise="lr_binary_per_channel", act=None, compile=True),
    "lr_w1a1_compiled": dict(label="LR W1A1 compiled", weights="lr_binary_per_channel",
                             depthwise="lr_binary_per_channel", act="stochastic_sign",
                             compile=True),
    "ste_w1": dict(label="STE W1", weights="brevitas_binary", depthwise="brevitas_binary",
                   act=None),
    "ste_w2": dict(label="STE W2 (ternary)", weights="brevitas_ternary",
                   depthwise="brevitas_ternary", act=None),
    "ste_w1a1": dict(label="STE W1A1", weights="brevitas_binary", depthwise="brevitas_binary",
                     act="ste_sign"),
}


def recipe_for(method: str, *, keep_first_last: bool = True, fp_names: Sequence[str] = (),
               depthwise_ternary: bool = False) -> Optional[dict]:
    """The recipe dict of `method` (None for FP): first conv + classifier float by default
    (timm pretrained_cfg), plus `fp_names` (exact module names) kept float."""
    spec = METHODS[method]
    if spec["weights"] is None:
        return None
    dw = spec["depthwise"]
    if depthwise_ternary and spec["act"] is None:
        dw = "lr_ternary_per_channel" if method.startswith("lr") else "brevitas_ternary"
    recipe = {
        "version": 1,
        "name": f"bench_{method}",
        "weights": {"conv": spec["weights"], "depthwise": dw, "linear": spec["weights"]},
        "keep_fp": {"first_conv": keep_first_last, "classifier": keep_first_last,
                    "names": list(fp_names)},
        "init": {"from_pretrained": True},
    }
    if spec["act"] is not None:
        recipe["activations"] = {"quantizer": spec["act"], "threshold_init": "median",
                                 "drop_relu": True, "moments": True}
    return recipe


def convert_method(model: nn.Module, method: str, example: torch.Tensor, **kw) -> nn.Module:
    """A converted deep copy of `model` (FP: the copy itself); thresholds calibrated."""
    from lr_quant.convert import convert
    from lr_quant.quant.threshold import calibrate_thresholds

    model = copy.deepcopy(model)
    recipe = recipe_for(method, **kw)
    if recipe is None:
        return model
    convert(model, recipe, example_input=example[:8])
    if METHODS[method]["act"] is not None:
        calibrate_thresholds(model, example)
    if METHODS[method].get("compile"):
        from lr_quant import set_compile

        set_compile(model)
    return model


def median(xs: List[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


@dataclass
class Stat:
    mean: float
    std: float
    values: List[float]

    @classmethod
    def of(cls, values: List[float]) -> "Stat":
        values = [float(v) for v in values]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(float(statistics.fmean(values)), float(std), values)
