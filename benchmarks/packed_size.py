"""CPU footprint report: a binarized / ternarized model before and after ``pack_model``.

Builds a small VGG-style CNN (or ``--timm NAME``, randomly initialized, no download),
gives every conv / linear except the first and the last a random discrete weight
(per-channel scale x {-1,+1}, or x {-1,0,+1} with ``--ternary``), packs it, and reports
per-layer and total state-dict bytes, serialized size, compression, and that the packed
model (torch reference path) reproduces the original outputs.

    python benchmarks/packed_size.py [--ternary] [--timm resnet18] [--out report.txt]
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import time

import torch
from torch import nn

from triton_kernels.deploy import pack_model


def vgg_like(num_classes: int = 10) -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 64), *block(64, 128), nn.MaxPool2d(2), *block(128, 256), *block(256, 256),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256 * 8 * 8, 512), nn.ReLU(),
                         nn.Linear(512, num_classes))


def discretize_(model: nn.Module, ternary: bool, seed: int = 0) -> list[str]:
    """Random discrete weights in all conv / linear layers but the first and the last."""
    g = torch.Generator().manual_seed(seed)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for _, m in layers[1:-1]:
        w = m.weight
        v = torch.randint(-1, 2, w.shape, generator=g) if ternary else torch.randint(0, 2, w.shape, generator=g) * 2 - 1
        scale = w.detach().abs().reshape(w.shape[0], -1).mean(1) + 1e-3
        with torch.no_grad():
            w.copy_(v.float() * scale.view(-1, *[1] * (w.dim() - 1)))
    return [n for n, _ in layers[1:-1]]


def state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def saved_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ternary", action="store_true")
    p.add_argument("--timm", default=None, help="a timm model name instead of the VGG-style CNN")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.timm:
        import timm

        model, size = timm.create_model(args.timm, pretrained=False, num_classes=10), 64
    else:
        model, size = vgg_like(), 32
    discretize_(model, args.ternary)
    model.eval()
    packed = copy.deepcopy(model)
    report = pack_model(packed, act="fp")
    x = torch.randn(8, 3, size, size)
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = model(x)
        t1 = time.perf_counter()
        out = packed(x)
        t2 = time.perf_counter()
    err = (out - ref).abs().max().item() / ref.abs().max().item()
    lines = [
        str(report),
        "",
        f"state dict: {state_bytes(model) / 2**20:8.2f} MiB fp32 -> {state_bytes(packed) / 2**20:8.2f} MiB packed "
        f"({state_bytes(model) / state_bytes(packed):.1f}x whole model)",
        f"torch.save: {saved_bytes(model) / 2**20:8.2f} MiB      -> {saved_bytes(packed) / 2**20:8.2f} MiB",
        f"packed layers alone: {report.compression:.1f}x smaller than their fp32 weights + biases",
        f"CPU forward (batch 8): original {1e3 * (t1 - t0):.1f} ms, packed (torch reference) {1e3 * (t2 - t1):.1f} ms",
        f"max |packed - original| / max |original| = {err:.2e}; "
        f"same predictions: {bool(torch.equal(out.argmax(1), ref.argmax(1)))}",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
