"""Measured evidence for the LR layer speed suggestions in docs/benchmarks.md (CPU).

    python -m benchmarks.probes [name ...]   # all: ~5 min on 2 shared cores; a small table

1. torch.cosh is not vectorized on CPU: elementwise op timings on a weight-sized tensor.
2. LRWeightMixin.lr_scale() calls quant_weight() (a weight-sized Brevitas quantization,
   forward and backward) only to read the scale; the scaling module alone gives the same.
3. The binary sign's training math: torch's log_ndtr-based composed ops against the fused
   autograd nodes now in lr_quant (issue 14).
4. One LR conv layer eager and compiled (lr_quant.compile_regions), with Inductor's own
   random numbers and with fallback_random (issue 14).
5. W1A1 steps with and without torch.set_flush_denormal(True) (denormal floats in the
   activation-moment path slow the CPU convolutions).
6. exp and erfc on arguments whose results are normal, subnormal or zero, with subnormals
   flushed and not (their underflow is a slow path whatever the flag; the sign nodes keep
   their arguments off it).
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


def sign_path(rounds=5) -> dict:
    """The binary sign's training math on 16x64x56x56 moments, forward + backward: the
    composed ops (log_ndtr log-odds, erf / ndtr moments, straight-through sample) against
    the fused autograd nodes of lr_quant.functional.sign_fused."""
    from lr_quant.functional import sign as S

    g = torch.Generator().manual_seed(0)
    m = torch.randn(16 * 64 * 56 * 56, generator=g).requires_grad_(True)
    v = (torch.rand(m.shape, generator=g) + 0.1).requires_grad_(True)

    def composed():
        z = S.sign_z(m, v)
        log_odds = torch.special.log_ndtr(z) - torch.special.log_ndtr(-z)
        mean, var = torch.erf(z * 0.7071067811865476), 4.0 * S.ndtr(z) * S.ndtr(-z)
        u = torch.rand_like(log_odds).clamp(1e-38, 1 - 6e-8)
        y = log_odds + torch.log(u) - torch.log1p(-u)
        soft = 2.0 * torch.sigmoid(y) - 1.0
        s = S.binary_sign(y.detach()) + (soft - soft.detach())
        (s.sum() + mean.sum() + var.sum()).backward()

    def fused():
        log_odds, mean, var = S.sign_log_odds_and_moments(m, v)
        s = S.relaxed_sign_sample(log_odds, 1.0, validate=False)
        (s.sum() + mean.sum() + var.sum()).backward()

    return _alternate({"composed (log_ndtr)": composed, "fused (sign_fused)": fused}, rounds)


def compiled_lr_layer(rounds=7) -> dict:
    """One 64->64 3x3 LR conv at 56x56, batch 16, forward + backward: eager, the compiled
    region with Inductor's own random numbers, and with lr_quant's CPU options
    (fallback_random, NCHW layout), against the float conv."""
    import copy

    import lr_quant.nn.lr_weight as lr_weight
    from lr_quant import LRQuantConv2d, set_compile
    from lr_quant.compile_regions import inductor_options
    from lr_quant.quant import lr_weight_quant

    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    base = LRQuantConv2d.from_float(conv, weight_quant=lr_weight_quant("binary", True)).train()
    x = torch.randn(16, 64, 56, 56, requires_grad=True)
    compiled_fns = {
        "inductor random": torch.compile(lr_weight.LRWeightMixin._lr_sample_core,
                                         options={**inductor_options("cpu"),
                                                  "fallback_random": False}),
        "fallback_random": torch.compile(lr_weight.LRWeightMixin._lr_sample_core,
                                         options=inductor_options("cpu"))}
    original = lr_weight.compiled
    layers = {}

    def runner(name):
        layer = layers.setdefault(name, copy.deepcopy(base))
        if name != "eager":
            set_compile(layer)

        def run():
            if name != "eager":
                lr_weight.compiled = lambda fn, device_type: compiled_fns[name]
            try:
                layer(x).sum().backward()
            finally:
                lr_weight.compiled = original
        return run

    return _alternate({"FP conv": lambda: conv(x).sum().backward(),
                       "LR eager": runner("eager"),
                       "LR compiled, inductor random": runner("inductor random"),
                       "LR compiled, fallback_random": runner("fallback_random")}, rounds)


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


def underflow(rounds=9) -> dict:
    """exp / erfc over 16x64x28x28 floats (an LR layer output at 112x112, batch 16)."""
    g = torch.Generator().manual_seed(0)
    u = torch.rand(16 * 64 * 28 * 28, generator=g)
    args = {"exp, normal results": (torch.exp, -80 * u),
            "exp, subnormal results": (torch.exp, -87.5 - 15 * u),
            "exp, results 0": (torch.exp, -110 - 50 * u),
            "erfc, normal results": (torch.erfc, 9 * u),
            "erfc, subnormal results": (torch.erfc, 9.2 + 0.8 * u),
            "erfc, results 0": (torch.erfc, 10.1 + 5 * u)}
    fns = {}
    for flush in (False, True):
        for name, (fn, x) in args.items():
            def run(fn=fn, x=x, flush=flush):
                torch.set_flush_denormal(flush)
                fn(x)
            fns[name + (", flushed" if flush else "")] = run
    try:
        return _alternate(fns, rounds)
    finally:
        torch.set_flush_denormal(False)


PROBES = {"elementwise": ("elementwise op on 2.36M floats (ms)", elementwise),
          "scale_lookup": ("LR per-channel scale of a 512x512x3x3 layer, fwd+bwd (ms)",
                           scale_lookup),
          "sign_path": ("sign training math, 3.2M elements, fwd+bwd (ms)", sign_path),
          "compiled_lr_layer": ("one LR 3x3 conv 64->64, 56x56, batch 16, fwd+bwd (ms)",
                                compiled_lr_layer),
          "flush_denormal": ("resnet18 W1A1 training step, batch 32, 32x32 (ms)",
                             flush_denormal),
          "underflow": ("exp / erfc on 802,816 floats (ms)", underflow)}


def main(argv=None) -> int:
    names = list(sys.argv[1:] if argv is None else argv) or list(PROBES)
    unknown = sorted(set(names) - set(PROBES))
    if unknown:
        print(f"unknown probe(s) {unknown}; choose from {sorted(PROBES)}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    for name in names:
        title, fn = PROBES[name]
        res = fn()
        print(title)
        for k, v in res.items():
            print(f"  {k:34s} {v:8.2f}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
