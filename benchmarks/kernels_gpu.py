"""GPU benchmark of the packed GEMM kernels against a bf16 ``torch.matmul``.

For each (M, N, K) and kernel it reports time, TFLOP/s (2 M N K / t; for integer kernels
"TOP/s"), achieved GB/s (bytes of x + packed w + scales + out, read / written once) and
the memory-bandwidth floor: bytes / peak bandwidth, the time a purely memory-bound kernel
could not beat. Small-M GEMMs are memory bound, where 1-2 bit weights pay off.

    python benchmarks/kernels_gpu.py [--shapes 1x4096x4096,...] [--peak-gbs 3350] [--out report.json]

Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

DEFAULT_SHAPES = "1x4096x4096,16x4096x4096,128x4096x4096,1024x4096x4096,4096x4096x4096,8x11008x4096"


def _peak_gbs(device: int) -> float | None:
    """Peak DRAM bandwidth from the device properties (2 x clock x bus width), if exposed."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100) * 1e-3  # seconds


def _cases(m: int, n: int, k: int):
    """(name, callable, bytes moved) for every kernel at one shape."""
    from triton_kernels import ops
    from triton_kernels.packing import pack_binary, pack_ternary

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    w_pm1 = torch.randint(0, 2, (n, k), device=dev, generator=g) * 2 - 1
    w_ter = torch.randint(-1, 2, (n, k), device=dev, generator=g)
    wp, wt = pack_binary(w_pm1), pack_ternary(w_ter)
    x16 = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    xh = x16.to(torch.float16)
    x8 = torch.randint(-128, 128, (m, k), device=dev, dtype=torch.int8)
    xp = pack_binary(torch.randint(0, 2, (m, k), device=dev, generator=g) * 2 - 1)
    w16 = w_pm1.to(torch.bfloat16)
    scale = torch.ones(n, device=dev)
    nb = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    out16, out32 = m * n * 2, m * n * 4
    return [
        ("torch bf16 matmul", lambda: x16 @ w16.T, nb(x16, w16) + out16),
        ("W1A16 bf16", lambda: ops.w1a16_gemm(x16, wp, k, scale), nb(x16, wp, scale) + out16),
        ("W1A16 fp16", lambda: ops.w1a16_gemm(xh, wp, k, scale), nb(xh, wp, scale) + out16),
        ("W2A16 bf16", lambda: ops.w2a16_gemm(x16, wt, k, scale), nb(x16, wt, scale) + out16),
        ("W1A8 int8", lambda: ops.w1a8_gemm(x8, wp, k), nb(x8, wp) + out32),
        ("W1A1 int8 (unpack)", lambda: ops.w1a1_int8_gemm(xp, wp, k), nb(xp, wp) + out32),
        ("W1A1 xnor-popcount", lambda: ops.xnor_gemm(xp, wp, k), nb(xp, wp) + out32),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated MxNxK")
    p.add_argument("--peak-gbs", type=float, default=None, help="peak DRAM GB/s (default: from device properties)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("kernels_gpu: no CUDA device available; nothing to benchmark (the CPU path is the torch reference).")
        return 0
    peak = args.peak_gbs or _peak_gbs(torch.cuda.current_device())
    print(f"device: {torch.cuda.get_device_name()}  peak DRAM: {peak or float('nan'):.0f} GB/s")
    rows = []
    header = f"{'M x N x K':>18} {'kernel':<20} {'us':>9} {'TFLOP/s':>8} {'GB/s':>8} {'floor us':>9} {'x floor':>7}"
    print(header)
    for shape in args.shapes.split(","):
        m, n, k = (int(v) for v in shape.lower().split("x"))
        for name, fn, nbytes in _cases(m, n, k):
            t = _bench(fn)
            floor = nbytes / (peak * 1e9) if peak else float("nan")
            row = dict(m=m, n=n, k=k, kernel=name, seconds=t, tflops=2 * m * n * k / t / 1e12,
                       gbs=nbytes / t / 1e9, bytes=nbytes, floor_seconds=floor)
            rows.append(row)
            print(f"{shape:>18} {name:<20} {t * 1e6:9.1f} {row['tflops']:8.1f} {row['gbs']:8.0f} "
                  f"{floor * 1e6:9.1f} {t / floor:7.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
