"""Training step time and training memory: FP vs LR vs Brevitas STE on timm CNNs (CPU).

All configurations of one model live in one process and are timed *alternately* (round
robin, a different starting configuration each round), so machine load that drifts over
the run hits every configuration alike; we report medians over rounds and ratios to FP.

Memory is measured deterministically: the bytes of the unique tensor storages saved for
backward (``torch.autograd.graph.saved_tensors_hooks``) during one training forward,
excluding storages that are parameters, plus parameters + gradients + optimizer state
(SGD momentum). Peak RSS is not reported: in one process it is monotone and mixes all
configurations.
"""

from __future__ import annotations

import time
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from .common import METHODS, convert_method, median

SPEED_METHODS = ["fp", "lr_w1", "lr_w1_compiled", "lr_w2", "lr_w1a1", "lr_w1a1_compiled",
                 "ste_w1", "ste_w1a1"]


def _plain(t):
    return t.value if hasattr(t, "value") and not isinstance(t, torch.Tensor) else t


def build(model_name: str, method: str, image_size: int, example: torch.Tensor) -> nn.Module:
    import timm

    torch.manual_seed(0)
    base = timm.create_model(model_name, pretrained=False, num_classes=10)
    # mobilenet-style nets follow recipes/mobilenet_w1.yaml: ternary depthwise in W1
    dw_ternary = "mobilenet" in model_name or "efficientnet" in model_name
    return convert_method(base, method, example, depthwise_ternary=dw_ternary)


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def saved_tensor_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Unique non-parameter storages saved for backward in one training forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: Dict[object, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except Exception:  # tensor subclasses without a storage: count their elements
            key, nbytes = ("id", id(t)), t.numel() * t.element_size()
        if key not in params and key != 0:
            seen[key] = max(seen.get(key, 0), nbytes)
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(_plain(model(x)), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


class Config:
    def __init__(self, model_name: str, method: str, model: nn.Module):
        self.model_name, self.method, self.model = model_name, method, model
        self.opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                   lr=1e-4, momentum=0.9)
        self.times: List[float] = []

    def step(self, x, y) -> float:
        self.model.train()
        t0 = time.perf_counter()
        loss = F.cross_entropy(_plain(self.model(x)), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0


def profile_step(cfg: Config, x, y, steps: int = 2, top: int = 12) -> dict:
    from torch.profiler import ProfilerActivity, profile

    cfg.step(x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            cfg.step(x, y)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = []
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
        rows.append(dict(op=e.key, self_ms_per_step=e.self_cpu_time_total / 1e3 / steps,
                         calls_per_step=e.count / steps,
                         share=e.self_cpu_time_total / total if total else 0.0))
    conv = sum(e.self_cpu_time_total for e in events
               if "convolution" in e.key or "mkldnn_conv" in e.key or e.key == "aten::addmm"
               or e.key == "aten::mm")
    return dict(method=cfg.method, total_self_ms_per_step=total / 1e3 / steps,
                conv_gemm_ms_per_step=conv / 1e3 / steps, top=rows)


def run_model(model_name: str, rounds: int, batch: int, image_size: int,
              methods=SPEED_METHODS, profile_methods=("fp", "lr_w1", "ste_w1", "lr_w1a1"),
              log=print) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    configs, errors = [], {}
    for m in methods:
        try:
            configs.append(Config(model_name, m, build(model_name, m, image_size, x)))
        except Exception as e:  # a method that does not convert is reported, not fatal
            errors[m] = f"{type(e).__name__}: {e}"
            log(f"  {model_name} {m}: FAILED {errors[m]}")
    memory = {}
    for c in configs:
        saved = saved_tensor_bytes(c.model, x, y)
        params = param_bytes(c.model)
        memory[c.method] = dict(saved_bytes=saved, param_bytes=params,
                                total_bytes=saved + 3 * params)  # params + grads + momentum
    for c in configs:  # warm-up (oneDNN primitive caches, allocator)
        c.step(x, y)
        c.step(x, y)
    for r in range(rounds):
        for i in range(len(configs)):
            c = configs[(i + r) % len(configs)]
            c.times.append(c.step(x, y))
        log(f"  {model_name} round {r + 1}/{rounds}: " +
            " ".join(f"{c.method}={1e3 * c.times[-1]:.0f}ms" for c in configs))
    times = {c.method: dict(median_s=median(c.times), samples_s=c.times) for c in configs}
    profiles = {}
    for c in configs:
        if c.method in profile_methods:
            profiles[c.method] = profile_step(c, x, y)
    fp_t = times.get("fp", {}).get("median_s")
    fp_m = memory.get("fp", {}).get("total_bytes")
    for m, t in times.items():
        t["ratio_fp"] = t["median_s"] / fp_t if fp_t else None
        memory[m]["ratio_fp"] = memory[m]["total_bytes"] / fp_m if fp_m else None
    # per-round ratios: robust to load drift (same round = same machine state)
    if "fp" in times:
        fp_samples = times["fp"]["samples_s"]
        for m, t in times.items():
            t["ratio_fp_per_round_median"] = median(
                [a / b for a, b in zip(t["samples_s"], fp_samples)])
    return dict(model=model_name, case=f"{model_name} {image_size}x{image_size} b{batch}",
                batch=batch, image_size=image_size, rounds=rounds,
                threads=torch.get_num_threads(), times=times, memory=memory,
                profiles=profiles, errors=errors,
                labels={m: METHODS[m]["label"] for m in methods})


def conv_microbench(rounds: int, batch: int = 32, channels: int = 64, hw: int = 8,
                    log=print) -> dict:
    """One 3x3 conv layer (resnet18 layer1 at 32x32 input), forward + backward, variants of
    the LR computation, alternated; medians over rounds. Shows where the LR cost goes."""
    from brevitas.nn import QuantConv2d

    from lr_quant.nn import LRQuantConv2d
    from lr_quant.registry import get_weight_quantizer

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, channels, hw, hw, generator=g)
    w = nn.Parameter(torch.randn(channels, channels, 3, 3, generator=g) * 0.05)
    theta = nn.Parameter(torch.randn(channels, channels, 3, 3, generator=g))
    noise = torch.randn(batch, channels, hw, hw, generator=g)
    float_conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    lr_conv = LRQuantConv2d.from_float(float_conv, weight_quant=get_weight_quantizer(
        "lr_binary_per_channel").injector)
    ste_conv = QuantConv2d(channels, channels, 3, padding=1, bias=False,
                           weight_quant=get_weight_quantizer("brevitas_binary").injector,
                           return_quant_tensor=False)
    lr_conv.train(), ste_conv.train()

    def fp():
        return F.conv2d(x, w, padding=1)

    def two_convs_no_sample():
        mu, var = torch.tanh(theta / 2), 1 - torch.tanh(theta / 2) ** 2
        return F.conv2d(x, mu, padding=1) + F.conv2d(x * x, var, padding=1)

    def two_convs_sample_fixed_noise():
        mu = torch.tanh(theta / 2)
        var = 1 - mu * mu
        m, v = F.conv2d(x, mu, padding=1), F.conv2d(x * x, var, padding=1)
        return torch.addcmul(m, torch.sqrt(v + 1e-8), noise)

    def two_convs_sample_randn():
        mu = torch.tanh(theta / 2)
        var = 1 - mu * mu
        m, v = F.conv2d(x, mu, padding=1), F.conv2d(x * x, var, padding=1)
        return torch.addcmul(m, torch.sqrt(v + 1e-8), torch.randn_like(m))

    def grouped_conv():
        mu = torch.tanh(theta / 2)
        var = 1 - mu * mu
        out = F.conv2d(torch.cat([x, x * x], 1), torch.cat([mu, var], 0), padding=1, groups=2)
        m, v = out.chunk(2, 1)
        return torch.addcmul(m, torch.sqrt(v + 1e-8), noise)

    def lr_layer():
        return lr_conv(x)

    def ste_layer():
        return ste_conv(x)

    variants = dict(fp_conv=fp, ste_brevitas_layer=ste_layer,
                    two_convs_no_sampling=two_convs_no_sample,
                    two_convs_fixed_noise=two_convs_sample_fixed_noise,
                    two_convs_randn=two_convs_sample_randn,
                    grouped_conv_x_x2=grouped_conv, lr_layer=lr_layer)
    times = {k: [] for k in variants}
    x = x0.clone().requires_grad_(True)

    def run(fn):
        t0 = time.perf_counter()
        out = fn()
        out.backward(torch.ones_like(out))
        return time.perf_counter() - t0

    names = list(variants)
    for fn in variants.values():
        run(fn), run(fn)
    for r in range(rounds):
        for i in range(len(names)):
            k = names[(i + r) % len(names)]
            times[k].append(run(variants[k]))
    # randn alone, for the output shape
    rn = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        torch.randn(batch, channels, hw, hw)
        rn.append(time.perf_counter() - t0)
    out = {k: dict(median_ms=1e3 * median(v)) for k, v in times.items()}
    base = out["fp_conv"]["median_ms"]
    for v in out.values():
        v["ratio_fp"] = v["median_ms"] / base
    out["randn_output_shape"] = dict(median_ms=1e3 * median(rn), ratio_fp=1e3 * median(rn) / base)
    log("  conv microbench: " + " ".join(f"{k}={v['median_ms']:.2f}ms" for k, v in out.items()))
    return dict(shape=dict(batch=batch, channels=channels, hw=hw, kernel=3), variants=out)
