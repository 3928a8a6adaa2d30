"""2-D convolution through the packed GEMMs by im2col (``F.unfold``).

    cols = unfold(x) : [B, C*kh*kw, L]   (L = Ho * Wo; column order (c, i, j) = the order
                                          of ``weight.reshape(N, -1)``)
    y[b, :, l] = (cols[b, :, l] @ w^T) * scale + bias  ->  [B, N, Ho, Wo]

Zero padding: for bipolar inputs the sign is taken *before* unfolding, so padded
positions are 0 exactly as in ``conv2d(sign(x), w, padding=p)``; such columns hold
{-1, 0, +1} and run through the int8 (W1A8) path, still exact. ``groups`` must be 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import bipolar, packed_matmul

__all__ = ["conv_output_size", "conv_pair", "packed_conv2d"]


def conv_pair(name: str, value, minimum: int) -> tuple[int, int]:
    """``value`` (an int or a pair of ints) as a pair, each ``>= minimum``; a ValueError
    naming the argument otherwise (a stride of 0 would divide by zero further down)."""
    pair = (value, value) if isinstance(value, int) else value
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """``floor((size + 2 p - d (k - 1) - 1) / s) + 1``."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def packed_conv2d(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    kernel_size: int | tuple[int, int],
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    in_channels: int | None = None,
    weight_bits: int = 1,
    act_bits: int = 16,
    backend: str = "auto",
) -> torch.Tensor:
    """``conv2d(q(x), scale * w, bias)`` with ``w`` packed as ``[N, ceil(C*kh*kw/32)]``.

    Args:
        x: ``[B, C, H, W]`` float (``act_bits`` 1 / 16).
        kernel_size, stride, padding, dilation: ints or pairs, as in
            ``torch.nn.functional.conv2d`` (numeric padding only).
        in_channels: the C the weight was packed for, checked against x: the word count
            does not pin it (4 and 5 channels of a 3x3 kernel both take 2 words). A
            ``w_packed`` straight from ``pack_*`` records its K, which is checked as well.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D [B, C, H, W] tensor, got {getattr(x, 'shape', type(x))}")
    if act_bits not in (1, 16):
        raise ValueError(f"packed_conv2d supports act_bits 1 or 16, got {act_bits}")
    kh, kw = conv_pair("kernel_size", kernel_size, 1)
    stride, dilation = conv_pair("stride", stride, 1), conv_pair("dilation", dilation, 1)
    padding = conv_pair("padding", padding, 0)
    b, c, h, w = x.shape
    if in_channels is not None and c != in_channels:
        raise ValueError(f"x has {c} channels, the packed weight is for in_channels={in_channels}")
    k = c * kh * kw
    ho = conv_output_size(h, kh, stride[0], padding[0], dilation[0])
    wo = conv_output_size(w, kw, stride[1], padding[1], dilation[1])
    if ho < 1 or wo < 1:
        raise ValueError(f"input {h}x{w} is smaller than the (dilated, padded) kernel")
    if act_bits == 1:
        x = bipolar(x)
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [B, K, L]
    cols = cols.transpose(1, 2).reshape(b * ho * wo, k)
    if act_bits == 1 and any(padding):
        # Columns hold {-1, 0, +1}: exact int8 GEMM for binary weights, floats for ternary.
        if weight_bits == 1:
            y = packed_matmul(cols.to(torch.int8), w_packed, k, scale, bias, weight_bits=1, act_bits=8,
                              backend=backend, out_dtype=x.dtype)
        else:
            y = packed_matmul(cols, w_packed, k, scale, bias, weight_bits=2, act_bits=16, backend=backend)
    else:
        y = packed_matmul(cols, w_packed, k, scale, bias, weight_bits=weight_bits,
                          act_bits=act_bits, backend=backend)
    n = y.shape[-1]
    return y.reshape(b, ho * wo, n).transpose(1, 2).reshape(b, n, ho, wo)
