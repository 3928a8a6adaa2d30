"""Triton kernel bodies for bit-packed GEMMs (layout: :mod:`triton_kernels.packing`).

All kernels compute ``out[M, N] = x[M, K] @ w[N, K]^T`` (the ``F.linear`` convention)
with the weight packed along K. Launch them through :mod:`triton_kernels.ops`, which
validates the operands, picks block sizes and falls back to the torch reference.

- :func:`xnor_gemm_kernel` (W1A1): ``dot = K - 2 * popcount(x_bits xor w_bits)`` on
  int32 words, SWAR popcount (runs in the interpreter, compiles to ``POPC``).
- :func:`binary_int8_gemm_kernel` (W1A1 / W1A8): unpacks ±1 weights (and ±1 activations
  when ``X_PACKED``) to int8 and feeds ``tl.dot`` with exact int32 accumulation
  (``IMMA`` / ``IGMMA`` tensor cores).
- :func:`packed_fp_gemm_kernel` (W1A16 / ternary W2A16): unpacks the weight in registers
  to the activation dtype, ``tl.dot`` in fp32 accumulation, then
  ``out = acc * scale[n] (+ bias[n])``.

This module holds only ``@triton.jit`` code: :mod:`triton_kernels.runtime` may execute it
a second time under the Triton interpreter, so it must not keep state. The kernels call
no ``@triton.jit`` function of triton's standard library (``tl.sum``, ``tl.zeros`` ...):
those are compiled or interpreted once, when triton is imported, and cannot serve both
copies. Reductions use ``tl.reduce`` with triton's own ``_sum_combine`` (which the
interpreter maps to ``numpy.sum``).
"""

import triton
import triton.language as tl
from triton.language.standard import _sum_combine


@triton.jit
def popcount32(v):
    """Number of set bits of each int32 word (SWAR; LLVM turns the idiom into POPC)."""
    u = v.to(tl.uint32, bitcast=True)
    u = u - ((u >> 1) & 0x55555555)
    u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
    u = (u + (u >> 4)) & 0x0F0F0F0F
    u = (u * 0x01010101) >> 24
    return u.to(tl.int32, bitcast=True)


@triton.jit
def unpack_rows(words, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 words ``[ROWS, BLOCK_K // 32]`` -> bits ``[ROWS, BLOCK_K]`` (k = 32 * word + bit)."""
    shifts = tl.arange(0, 32)
    bits = (words[:, :, None] >> shifts[None, None, :]) & 1
    return tl.reshape(bits, (ROWS, BLOCK_K))


@triton.jit
def unpack_cols(words, BLOCK_K: tl.constexpr, COLS: tl.constexpr):
    """int32 words ``[BLOCK_K // 32, COLS]`` -> bits ``[BLOCK_K, COLS]`` (k = 32 * word + bit)."""
    shifts = tl.arange(0, 32)
    bits = (words[:, None, :] >> shifts[None, :, None]) & 1
    return tl.reshape(bits, (BLOCK_K, COLS))


@triton.jit
def xnor_gemm_kernel(
    x_ptr, w_ptr, out_ptr,
    M, N, K, KW,
    stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    """W1A1: ``out[m, n] = K - 2 * sum_i popcount(x[m, i] ^ w[n, i])`` (int32)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=tl.int32)
    for kw0 in range(0, KW, BLOCK_KW):
        offs_kw = kw0 + tl.arange(0, BLOCK_KW)
        mask_kw = offs_kw < KW
        # Missing words load as 0 in both operands: xor = 0, no contribution.
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_kw[None, :],
                    mask=mask_m[:, None] & mask_kw[None, :], other=0)
        b = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_kw[None, :],
                    mask=mask_n[:, None] & mask_kw[None, :], other=0)
        acc += tl.reduce(popcount32(a[:, None, :] ^ b[None, :, :]), 2, _sum_combine)
    out = K - 2 * acc
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out,
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def binary_int8_gemm_kernel(
    x_ptr, w_ptr, out_ptr,
    M, N, K, KW,
    stride_xm, stride_wn, stride_om,
    X_PACKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """W1A1 (``X_PACKED``: x is int32 words) or W1A8 (x is int8): exact int32 ``x @ w^T``."""
    BLOCK_KW: tl.constexpr = BLOCK_K // 32
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_kw = k0 // 32 + tl.arange(0, BLOCK_KW)
        mask_kw = offs_kw < KW
        if X_PACKED:
            xw = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_kw[None, :],
                         mask=mask_m[:, None] & mask_kw[None, :], other=0)
            xb = unpack_rows(xw, BLOCK_M, BLOCK_K)
            # Padding bits (k >= K) would read as -1 * -1: zero them on this side.
            a = tl.where(offs_k[None, :] < K, 2 * xb - 1, 0).to(tl.int8)
        else:
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & (offs_k[None, :] < K), other=0)
        ww = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_kw[:, None],
                     mask=mask_kw[:, None] & mask_n[None, :], other=0)
        b = (2 * unpack_cols(ww, BLOCK_K, BLOCK_N) - 1).to(tl.int8)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc,
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def packed_fp_gemm_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,
    M, N, K, KW,
    stride_xm, stride_wn, stride_om,
    TERNARY: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """W1A16 / W2A16: ``out = (x @ w^T) * scale[n] (+ bias[n])``, fp32 accumulation.

    The weight is read as 1 bit (binary) or 2 bit planes (ternary; plane stride KW) and
    unpacked in registers to the dtype of x. ``DOT_FP32`` runs the dot in fp32 (used for
    fp32 inputs and for bf16 in the interpreter, whose bf16 ``tl.dot`` is wrong).
    """
    BLOCK_KW: tl.constexpr = BLOCK_K // 32
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_kw = k0 // 32 + tl.arange(0, BLOCK_KW)
        mask_kw = offs_kw < KW
        # x is zero beyond K, so the (finite) padded weights never contribute.
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_kw[:, None]
        w_mask = mask_kw[:, None] & mask_n[None, :]
        sign = unpack_cols(tl.load(w_ptrs, mask=w_mask, other=0), BLOCK_K, BLOCK_N)
        if TERNARY:
            nonzero = unpack_cols(tl.load(w_ptrs + KW, mask=w_mask, other=0), BLOCK_K, BLOCK_N)
            wv = nonzero * (2 * sign - 1)
        else:
            wv = 2 * sign - 1
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), wv.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, wv.to(a.dtype), acc)
    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
    out = acc * scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
