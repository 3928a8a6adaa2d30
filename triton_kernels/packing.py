"""Bit packing of binary {-1,+1} and ternary {-1,0,+1} tensors along the reduction axis.

Layout (shared by the torch reference and every Triton kernel)
--------------------------------------------------------------
A tensor ``v`` of shape ``[..., K]`` with values in {-1, +1} is stored as int32 words of
shape ``[..., KW]`` with ``KW = ceil(K / 32)``::

    bit j of word i  <->  element k = 32 * i + j      (LSB first)
    bit = 1  <->  +1,   bit = 0  <->  -1

K is padded to ``32 * KW`` with 0 bits. Both GEMM operands are padded with the same bits,
so the padded positions agree and drop out of the XNOR-popcount identity, which uses the
*true* K::

    dot(a, b) = sum_k a_k b_k = K - 2 * popcount(a_bits xor b_bits)

Ternary tensors (values in {-1, 0, +1}) use 2 bits per weight as two bit planes, each
laid out exactly like a binary packing, stacked on a new axis before the word axis::

    packed[..., 0, :] = sign plane     (bit 1 <-> +1; 0 for -1 and for 0)
    packed[..., 1, :] = nonzero plane  (bit 1 <-> value != 0)
    value = nonzero * (2 * sign - 1)

Padding bits are 0 in both planes (value 0). The word is an int32 whose bit 31 is the
sign bit, so word values span the whole int32 range.

The words alone do not say K: 70 and 90 both take 3 words, and a K that is too large
counts padding bits as matches (``xnor_gemm(x, w, 90)`` on K = 70 is off by 20). So the
``pack_*`` functions record the true K on the tensor they return (:func:`packed_k`, kept by
``torch.save``; a copy or slice does not carry it) and the ops refuse any other ``k``.
"""

from __future__ import annotations

import torch

__all__ = [
    "WORD_BITS",
    "num_words",
    "pack_binary",
    "unpack_binary",
    "pack_ternary",
    "unpack_ternary",
    "pack_bits",
    "unpack_bits",
    "packed_k",
]

WORD_BITS = 32


def num_words(k: int) -> int:
    """Number of int32 words holding ``k`` bits: ``ceil(k / 32)``."""
    if k < 1:
        raise ValueError(f"K must be >= 1, got {k}")
    return (k + WORD_BITS - 1) // WORD_BITS


_PACKED_K = "packed_k"


def packed_k(words: torch.Tensor) -> int | None:
    """The true K that ``pack_*`` packed ``words`` from, or None where unknown."""
    return getattr(words, _PACKED_K, None)


def _with_k(words: torch.Tensor, k: int) -> torch.Tensor:
    setattr(words, _PACKED_K, int(k))
    return words


def _bit_weights(device: torch.device) -> torch.Tensor:
    # 2**j for j = 0..31 as int64 (2**31 does not fit int32).
    return torch.pow(2, torch.arange(WORD_BITS, device=device, dtype=torch.int64))


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a {0,1} (or bool) tensor ``[..., K]`` into int32 words ``[..., ceil(K/32)]``, LSB first."""
    if bits.dim() < 1:
        raise ValueError("pack_bits needs a tensor with at least one dimension (K last)")
    k = bits.shape[-1]
    kw = num_words(k)
    b = bits.to(torch.int64)
    pad = kw * WORD_BITS - k
    if pad:
        b = torch.nn.functional.pad(b, (0, pad))
    b = b.reshape(*bits.shape[:-1], kw, WORD_BITS)
    words = (b * _bit_weights(bits.device)).sum(dim=-1)  # in [0, 2**32)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement
    return _with_k(words.to(torch.int32).contiguous(), k)


def unpack_bits(words: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 words ``[..., KW]`` -> uint8 bits ``[..., k]``."""
    if words.dtype != torch.int32:
        raise TypeError(f"packed words must be int32, got {words.dtype}")
    if words.dim() < 1:
        raise ValueError("packed words need at least one dimension")
    kw = words.shape[-1]
    if num_words(k) != kw:
        raise ValueError(f"K={k} needs {num_words(k)} words, got {kw}")
    shifts = torch.arange(WORD_BITS, device=words.device, dtype=torch.int32)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # arithmetic shift, then keep one bit
    return bits.reshape(*words.shape[:-1], kw * WORD_BITS)[..., :k].to(torch.uint8)


def _check_values(v: torch.Tensor, allowed: tuple[int, ...], what: str) -> None:
    if v.is_complex() or v.dtype == torch.bool:
        raise TypeError(f"{what} must be a real numeric tensor, got {v.dtype}")
    if v.dim() < 1:
        raise ValueError(f"{what} needs at least one dimension (K last)")
    ok = torch.zeros_like(v, dtype=torch.bool)
    for a in allowed:
        ok |= v == a
    if not bool(ok.all()):
        bad = v[~ok].flatten()[:4].tolist()
        raise ValueError(f"{what} must only contain values {allowed}; found e.g. {bad}")


def pack_binary(v: torch.Tensor) -> torch.Tensor:
    """Pack ±1 values ``[..., K]`` into int32 words ``[..., ceil(K/32)]`` (bit 1 = +1)."""
    _check_values(v, (-1, 1), "binary tensor")
    return pack_bits(v > 0)


def unpack_binary(words: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_binary`: words ``[..., KW]`` -> ±1 values ``[..., k]`` of ``dtype``."""
    bits = unpack_bits(words, k)
    return (2 * bits.to(torch.int8) - 1).to(dtype)


def pack_ternary(v: torch.Tensor) -> torch.Tensor:
    """Pack {-1,0,+1} values ``[..., K]`` into int32 bit planes ``[..., 2, ceil(K/32)]``."""
    _check_values(v, (-1, 0, 1), "ternary tensor")
    planes = torch.stack([pack_bits(v > 0), pack_bits(v != 0)], dim=-2).contiguous()
    return _with_k(planes, v.shape[-1])


def unpack_ternary(words: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: planes ``[..., 2, KW]`` -> values ``[..., k]`` of ``dtype``."""
    if words.dim() < 2 or words.shape[-2] != 2:
        raise ValueError(f"ternary packing has shape [..., 2, KW], got {tuple(words.shape)}")
    sign = unpack_bits(words[..., 0, :], k).to(torch.int8)
    nonzero = unpack_bits(words[..., 1, :], k).to(torch.int8)
    return (nonzero * (2 * sign - 1)).to(dtype)
