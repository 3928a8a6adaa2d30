"""Torch reference of every packed GEMM: the CPU path and the semantics the kernels match.

Same operands and results as :mod:`triton_kernels.ops` (``out = x @ w^T``, weights packed
along K as in :mod:`triton_kernels.packing`). Integer results are exact: the ±1 / int8
products are accumulated in float64 (exact below 2**53) and converted to int32.
"""

from __future__ import annotations

import torch

from .packing import unpack_binary, unpack_ternary

__all__ = ["xnor_gemm_ref", "w1a8_gemm_ref", "w1a16_gemm_ref", "w2a16_gemm_ref"]


def _int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.to(torch.float64) @ b.to(torch.float64).T).round().to(torch.int32)


def xnor_gemm_ref(x_packed: torch.Tensor, w_packed: torch.Tensor, k: int) -> torch.Tensor:
    """W1A1: ``out[m, n] = sum_k x[m, k] w[n, k] = K - 2 popcount(x xor w)`` (int32 ``[M, N]``)."""
    return _int_matmul(unpack_binary(x_packed, k, torch.int8), unpack_binary(w_packed, k, torch.int8))


def w1a8_gemm_ref(x: torch.Tensor, w_packed: torch.Tensor, k: int) -> torch.Tensor:
    """W1A8: int8 ``x[M, K]`` times ±1 weights, exact int32 ``[M, N]``."""
    return _int_matmul(x, unpack_binary(w_packed, k, torch.int8))


def _scaled(acc: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
    out = acc * scale.to(acc.dtype)
    if bias is not None:
        out = out + bias.to(acc.dtype)
    return out.to(dtype)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    # fp16/bf16 matmul on CPU is slow or missing: accumulate in fp32 like the kernel does.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def w1a16_gemm_ref(
    x: torch.Tensor, w_packed: torch.Tensor, k: int, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """W1A16: ``out = (x @ w^T) * scale[n] + bias[n]``, w in {-1,+1}, in the dtype of x."""
    dt = _acc_dtype(x)
    acc = x.to(dt) @ unpack_binary(w_packed, k, dt).T
    return _scaled(acc, scale, bias, x.dtype)


def w2a16_gemm_ref(
    x: torch.Tensor, w_packed: torch.Tensor, k: int, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Ternary W2A16: ``out = (x @ w^T) * scale[n] + bias[n]``, w in {-1,0,+1}."""
    dt = _acc_dtype(x)
    acc = x.to(dt) @ unpack_ternary(w_packed, k, dt).T
    return _scaled(acc, scale, bias, x.dtype)
