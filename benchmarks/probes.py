"""Measured evidence for the LR layer speed suggestions in docs/benchmarks.md (CPU).

    python -m benchmarks.probes        # ~3 min on 2 shared cores; prints a small table

1. torch.cosh is not vectorized on CPU: elementwise op timings on a weight-sized tensor.
2. LRWeightMixin.lr_scale() calls quant_weight() (a weight-sized Brevitas quantization,
   forward and backward) only to read the scale; the scaling module alone gives the same.
3. resnet18 training step: _BinaryMoments with var = 4 e / (1 + e)^2, e = exp(-|theta|)
   (= sech^2(theta / 2)) instead of cosh(theta / 2)^-2 (monkeypatched here, not in lr_quant).
4. W1A1 steps with and without torch.set_flush_denormal(True) (denormal floats in the
   activation-moment path slow the CPU convolutions).
Every comparison alternates its configurations in one process; medians over rounds.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


def _alternate(fns: dict, rounds: int, setup=None) -> dict:
    names = list(fns)
    for n in names:
        fns[n]()
    ts = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            n = names[(i + r) % len(names)]
            t0 = time.perf_counter()
            fns[n]()
            ts[n].append(time.perf_counter() - t0)
    return {n: 1e3 * statistics.median(v) for n, v in ts.items()}


def elementwise(rounds=11) -> dict:
    t = torch.randn(512 * 512 * 9) * 3
    out = torch.empty_like(t)
    return _alternate({"tanh": lambda: torch.tanh(t, out=out),
                       "cosh": lambda: torch.cosh(t, out=out),
                       "exp": lambda: torch.exp(t, out=out),
                       "sigmoid": lambda: torch.sigmoid(t, out=out),
                       "mul": lambda: torch.mul(t, t, out=out)}, rounds)


def scale_lookup(rounds=9) -> dict:
    from lr_quant.nn import LRQuantConv2d
    from lr_quant.registry import get_weight_quantizer

    conv = nn.Conv2d(512, 512, 3, padding=1, bias=False)
    lr = LRQuantConv2d.from_float(
        conv, weight_quant=get_weight_quantizer("lr_binary_per_channel").injector)
    scaling = lr.weight_quant.tensor_quant.scaling_impl
    assert torch.allclose(scaling(lr.weight).reshape(-1), lr.quant_weight().scale.reshape(-1))
    return _alternate({
        "quant_weight().scale": lambda: lr.quant_weight().scale.sum().backward(),
        "scaling_impl(weight)": lambda: scaling(lr.weight).sum().backward()}, rounds)


def _resnet_steps(methods, rounds, toggles):
    import timm

    from .common import convert_method

    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    base = timm.create_model("resnet18", num_classes=10)
    models = {m: convert_method(base, m, x) for m in methods}
    opts = {m: torch.optim.SGD(models[m].parameters(), lr=1e-4, momentum=0.9) for m in models}

    def step(m, toggle):
        toggles[toggle]()
        models[m].train()
        loss = F.cross_entropy(models[m](x), y)
        opts[m].zero_grad()
        loss.backward()
        opts[m].step()

    return step


def binary_var_exp(rounds=5) -> dict:
    import lr_quant.distributions as D

    original = D._BinaryMoments.forward
    use_exp = [False]

    def forward(ctx, logits):
        if not use_exp[0]:
            return original(ctx, logits)
        mean = torch.tanh(0.5 * logits)
        e = logits.abs().neg_().exp_()
        var = e.div_((1 + e).square_()).mul_(4)
        ctx.save_for_backward(mean, var)
        return mean, var

    D._BinaryMoments.forward = staticmethod(forward)
    try:
        toggles = {"cosh": lambda: use_exp.__setitem__(0, False),
                   "exp": lambda: use_exp.__setitem__(0, True)}
        step = _resnet_steps(["fp", "lr_w1"], rounds, toggles)
        res = _alternate({"FP": lambda: step("fp", "cosh"),
                          "LR W1 (cosh)": lambda: step("lr_w1", "cosh"),
                          "LR W1 (exp)": lambda: step("lr_w1", "exp")}, rounds)
    finally:
        D._BinaryMoments.forward = original
    return res


def flush_denormal(rounds=4) -> dict:
    toggles = {"off": lambda: torch.set_flush_denormal(False),
               "on": lambda: torch.set_flush_denormal(True)}
    step = _resnet_steps(["fp", "lr_w1a1"], rounds, toggles)
    try:
        return _alternate({"FP": lambda: step("fp", "off"),
                           "LR W1A1": lambda: step("lr_w1a1", "off"),
                           "LR W1A1 flush_denormal": lambda: step("lr_w1a1", "on")}, rounds)
    finally:
        torch.set_flush_denormal(False)


def main(argv=None) -> int:
    torch.set_num_threads(1)
    for title, fn in [("elementwise op on 2.36M floats (ms)", elementwise),
                      ("LR per-channel scale of a 512x512x3x3 layer, fwd+bwd (ms)", scale_lookup),
                      ("resnet18 training step, batch 32, 32x32 (ms)", binary_var_exp),
                      ("resnet18 W1A1 training step, batch 32, 32x32 (ms)", flush_denormal)]:
        res = fn()
        print(title)
        for k, v in res.items():
            print(f"  {k:28s} {v:8.1f}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
