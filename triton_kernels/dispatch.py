"""One entry point for a packed layer's GEMM: choose the kernel from weight / activation
precision, shape and device.

    y = (q(x) @ w^T) * scale[n] + bias[n],   x: [..., K] -> y: [..., N]

``act_bits`` selects q: 16 = identity (x is fp16 / bf16 / fp32), 8 = x is already int8,
1 = bipolar sign ``q(x) = +1 if x >= 0 else -1`` (the QONNX BipolarQuant convention).

Kernel choice (``weight_bits``, ``act_bits``):
  (1, 1)   XNOR-popcount if M <= XNOR_MAX_M, else ±1 int8 on tensor cores (W1A8 kernel);
           popcount only pays at very small M: an sm_90 SM retires 16 POPC per clock
           (CUDA guide throughput table), i.e. ~512 bit-MACs/clk, against ~4096 dense
           int8 MACs/clk on tensor cores once M fills an MMA tile (H100 SXM: 1979 TOPS).
  (1, 8)   W1A8 int8 tensor cores, exact int32 accumulation.
  (1, 16)  W1A16, weight unpacked to fp16 / bf16 in registers.
  (2, *)   W2A16 (ternary weights); 1- or 8-bit activations go in as floats (exact).
"""

from __future__ import annotations

import torch

from . import ops
from .packing import pack_bits

__all__ = ["XNOR_MAX_M", "choose_w1a1_kernel", "bipolar", "packed_matmul"]

XNOR_MAX_M = 16


def choose_w1a1_kernel(m: int) -> str:
    """``"xnor"`` (popcount) for ``m <= XNOR_MAX_M`` rows, ``"int8"`` (tensor cores) above."""
    return "xnor" if m <= XNOR_MAX_M else "int8"


def bipolar(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``+1 where x >= 0 else -1`` (sign with sign(0) = +1), in ``dtype`` (default x's)."""
    one = torch.ones((), dtype=dtype or x.dtype, device=x.device)
    return torch.where(x >= 0, one, -one)


def _finish(acc: torch.Tensor, scale, bias, dtype: torch.dtype) -> torch.Tensor:
    out = acc.to(torch.float32) * scale.to(torch.float32)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(dtype)


def packed_matmul(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    k: int,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    weight_bits: int = 1,
    act_bits: int = 16,
    backend: str = "auto",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``(q(x) @ w^T) * scale + bias`` over the last axis of ``x`` (see the module docstring).

    Args:
        x: ``[..., K]``; float for ``act_bits`` 1 / 16, int8 for 8.
        w_packed: ``[N, KW]`` (binary) or ``[N, 2, KW]`` (ternary) int32.
        scale, bias: ``[N]`` per output channel.
        out_dtype: result dtype; default x's dtype (float32 for int8 x).
    """
    if weight_bits not in (1, 2):
        raise ValueError(f"weight_bits must be 1 (binary) or 2 (ternary), got {weight_bits}")
    if act_bits not in (1, 8, 16):
        raise ValueError(f"act_bits must be 1, 8 or 16, got {act_bits}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have K={k} features in its last axis, got shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.numel() and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if out_dtype is None:
        out_dtype = torch.float32 if act_bits == 8 else x.dtype
    n = w_packed.shape[0]

    if weight_bits == 2:
        if act_bits == 1:
            x2 = bipolar(x2, out_dtype)
        elif act_bits == 8:
            x2 = x2.to(out_dtype)
        y = ops.w2a16_gemm(x2, w_packed, k, scale, bias, backend=backend)
    elif act_bits == 16:
        y = ops.w1a16_gemm(x2, w_packed, k, scale, bias, backend=backend)
    elif act_bits == 8:
        y = _finish(ops.w1a8_gemm(x2, w_packed, k, backend=backend), scale, bias, out_dtype)
    elif choose_w1a1_kernel(x2.shape[0]) == "xnor":
        acc = ops.xnor_gemm(pack_bits(x2 >= 0), w_packed, k, backend=backend)
        y = _finish(acc, scale, bias, out_dtype)
    else:
        acc = ops.w1a8_gemm(bipolar(x2, torch.int8), w_packed, k, backend=backend)
        y = _finish(acc, scale, bias, out_dtype)
    return y.to(out_dtype).reshape(*lead, n)
