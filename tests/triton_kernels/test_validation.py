"""Operand checks of the packed GEMM operators: clear TypeError / ValueError messages."""

import pytest
import torch

from triton_kernels import ops
from triton_kernels.configs import BlockConfig
from triton_kernels.dispatch import packed_matmul
from triton_kernels.packing import pack_binary, pack_ternary

K, N = 40, 3


@pytest.fixture
def wp():
    return pack_binary(torch.ones(N, K))


def test_wrong_weight_dtype(wp):
    with pytest.raises(TypeError, match="w_packed must have dtype"):
        ops.w1a16_gemm(torch.zeros(2, K), wp.to(torch.int64), K, torch.ones(N))


def test_k_alignment(wp):
    with pytest.raises(ValueError, match=r"K alignment: k=70 needs ceil\(k/32\)=3 words"):
        ops.w1a16_gemm(torch.zeros(2, 70), wp, 70, torch.ones(N))
    with pytest.raises(ValueError, match="x_packed has 1 words per row, expected 2"):
        ops.xnor_gemm(torch.zeros(2, 1, dtype=torch.int32), wp, K)
    with pytest.raises(ValueError, match="x_packed has 1 words per row, expected 2"):
        ops.w1a1_int8_gemm(torch.zeros(2, 1, dtype=torch.int32), wp, K)
    with pytest.raises(ValueError, match="x has K=41 columns but k=40"):
        ops.w1a8_gemm(torch.zeros(2, 41, dtype=torch.int8), wp, K)
    with pytest.raises(ValueError, match="k must be a positive int"):
        ops.w1a16_gemm(torch.zeros(2, K), wp, 0, torch.ones(N))


def test_activation_dtype_and_rank(wp):
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.w1a16_gemm(torch.zeros(2, K, dtype=torch.float64), wp, K, torch.ones(N))
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.w1a8_gemm(torch.zeros(2, K), wp, K)
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops.w1a16_gemm(torch.zeros(K), wp, K, torch.ones(N))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        ops.w1a16_gemm([[0.0] * K], wp, K, torch.ones(N))


def test_scale_and_bias_shapes(wp):
    with pytest.raises(ValueError, match="scale must have N=3 entries"):
        ops.w1a16_gemm(torch.zeros(2, K), wp, K, torch.ones(4))
    with pytest.raises(ValueError, match="bias must have N=3 entries"):
        ops.w1a16_gemm(torch.zeros(2, K), wp, K, torch.ones(N), torch.zeros(2))
    with pytest.raises(ValueError, match="scale is required"):
        ops.w1a16_gemm(torch.zeros(2, K), wp, K, None)


def test_ternary_layout_required():
    wt = pack_ternary(torch.zeros(N, K))
    with pytest.raises(ValueError, match="w_packed .ternary. must be 3-D"):
        ops.w2a16_gemm(torch.zeros(2, K), wt[:, 0], K, torch.ones(N))
    with pytest.raises(ValueError, match=r"shape \[N, 2, KW\]"):
        ops.w2a16_gemm(torch.zeros(2, K), torch.zeros(N, 3, 2, dtype=torch.int32), K, torch.ones(N))


def test_contiguity(wp):
    with pytest.raises(ValueError, match="x must be contiguous along its last .K. axis"):
        ops.w1a16_gemm(torch.zeros(K, 2).T, wp, K, torch.ones(N))
    every_other = torch.zeros(N, 6, dtype=torch.int32)[:, ::2]  # [N, 3] with stride 2 along K
    with pytest.raises(ValueError, match="w_packed must be contiguous"):
        ops.xnor_gemm(torch.zeros(2, 3, dtype=torch.int32), every_other, 96)


def test_devices_and_backends(wp):
    with pytest.raises(ValueError, match="operands on different devices"):
        ops.w1a16_gemm(torch.zeros(2, K, device="meta"), wp, K, torch.ones(N))
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        ops.w1a16_gemm(torch.zeros(2, K), wp, K, torch.ones(N), backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.w1a16_gemm(torch.zeros(2, K), wp, K, torch.ones(N), backend="cuda")
    with pytest.raises(ValueError, match="interpret' runs on CPU tensors only"):
        ops.resolve_backend("interpret", torch.device("meta"))


def test_block_config_checks(wp):
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        BlockConfig(12, 16, 32)
    with pytest.raises(ValueError, match="block_k must be a multiple of 32"):
        ops.w1a16_gemm(torch.zeros(2, K), wp, K, torch.ones(N), backend="interpret", config=BlockConfig(16, 16, 16))


def test_packed_matmul_checks(wp):
    with pytest.raises(ValueError, match="weight_bits must be 1 .binary. or 2 .ternary."):
        packed_matmul(torch.zeros(2, K), wp, K, torch.ones(N), weight_bits=4)
    with pytest.raises(ValueError, match="act_bits must be 1, 8 or 16"):
        packed_matmul(torch.zeros(2, K), wp, K, torch.ones(N), act_bits=4)
    with pytest.raises(ValueError, match="K=40 features in its last axis"):
        packed_matmul(torch.zeros(2, K + 1), wp, K, torch.ones(N))
