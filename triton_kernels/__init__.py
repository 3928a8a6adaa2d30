"""Bit-packed binary / ternary GEMMs for lr_quant: packing, Triton kernels, torch reference,
dispatch, conv2d via im2col, and packed deployment layers (``pack_model``).

Imports only torch (and triton lazily, when a kernel is launched or compiled).

Modules: ``packing`` (bit layout), ``kernels`` (Triton bodies), ``reference`` (torch
oracle / CPU path), ``ops`` (checked launchers), ``configs`` (tiles), ``dispatch``
(kernel choice), ``conv`` (im2col), ``discrete`` (reading frozen weights), ``deploy``
(PackedLinear / PackedConv2d / pack_model), ``runtime`` (compiled vs interpreted
kernels), ``aot`` (compile for sm_XX without a GPU).
"""

from .conv import packed_conv2d
from .deploy import PackedConv2d, PackedLinear, PackReport, pack_model
from .discrete import DiscreteWeight, NotDiscreteError, discretize_weight, layer_weight
from .dispatch import choose_w1a1_kernel, packed_matmul
from .ops import w1a1_int8_gemm, w1a8_gemm, w1a16_gemm, w2a16_gemm, xnor_gemm
from .packing import num_words, pack_binary, pack_ternary, packed_k, unpack_binary, unpack_ternary

__all__ = [
    "pack_binary", "unpack_binary", "pack_ternary", "unpack_ternary", "num_words", "packed_k",
    "xnor_gemm", "w1a1_int8_gemm", "w1a8_gemm", "w1a16_gemm", "w2a16_gemm",
    "packed_matmul", "choose_w1a1_kernel", "packed_conv2d",
    "DiscreteWeight", "NotDiscreteError", "discretize_weight", "layer_weight",
    "PackedLinear", "PackedConv2d", "PackReport", "pack_model",
]
