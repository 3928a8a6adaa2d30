"""Every Triton kernel, run by the Triton interpreter on CPU tensors, against a float64
oracle computed from the unpacked values (bit-exact for the integer kernels)."""

import zlib

import pytest
import torch

from triton_kernels import ops
from triton_kernels.configs import BlockConfig
from triton_kernels.packing import pack_binary, pack_ternary

# (M, N, K): M = 1, odd N, K below / at / above word and block boundaries.
SHAPES = [(1, 1, 1), (1, 7, 33), (5, 13, 70), (17, 9, 31), (33, 17, 130), (16, 16, 64), (3, 40, 257)]


def _pm1(*shape, gen):
    return torch.randint(0, 2, shape, generator=gen) * 2 - 1


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("kernel", ["xnor", "int8"])
def test_w1a1_bit_exact(kernel, m, n, k):
    g = _gen("w1a1", m, n, k)
    x, w = _pm1(m, k, gen=g), _pm1(n, k, gen=g)
    oracle = (x.double() @ w.double().T).to(torch.int32)
    f = ops.xnor_gemm if kernel == "xnor" else ops.w1a1_int8_gemm
    out = f(pack_binary(x), pack_binary(w), k, backend="interpret")
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out, oracle)


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_w1a8_bit_exact(m, n, k):
    g = _gen("w1a8", m, n, k)
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = _pm1(n, k, gen=g)
    out = ops.w1a8_gemm(x, pack_binary(w), k, backend="interpret")
    assert torch.equal(out, (x.double() @ w.double().T).to(torch.int32))


# Tolerance: fp32 accumulation is exact to ~1e-6 here; the final rounding to the output dtype
# costs half an ulp, i.e. rtol = eps of the dtype.
RTOL = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 1e-5}


@pytest.mark.parametrize("m,n,k", SHAPES[1:6])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ternary", [False, True], ids=["w1a16", "w2a16"])
def test_fp_kernels(ternary, dtype, m, n, k):
    g = _gen("fp", ternary, str(dtype), m, n, k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randint(-1, 2, (n, k), generator=g) if ternary else _pm1(n, k, gen=g)
    scale = torch.rand(n, generator=g) + 0.25
    bias = torch.randn(n, generator=g) if m % 2 else None  # both with and without bias
    f = ops.w2a16_gemm if ternary else ops.w1a16_gemm
    out = f(x, pack_ternary(w) if ternary else pack_binary(w), k, scale, bias, backend="interpret")
    oracle = (x.double() @ w.double().T) * scale.double() + (bias.double() if bias is not None else 0)
    assert out.dtype == dtype and out.shape == (m, n)
    torch.testing.assert_close(out.double(), oracle, rtol=RTOL[dtype], atol=1e-3)


def test_larger_tiles_and_multiple_k_steps():
    # Non-default tiles: several K steps, partial last step, partial M / N tiles.
    g = _gen("tiles")
    m, n, k = 20, 24, 200
    x, w = _pm1(m, k, gen=g), _pm1(n, k, gen=g)
    xp, wp = pack_binary(x), pack_binary(w)
    oracle = (x.double() @ w.double().T).to(torch.int32)
    assert torch.equal(ops.xnor_gemm(xp, wp, k, backend="interpret", config=BlockConfig(16, 16, 4)), oracle)
    assert torch.equal(ops.w1a1_int8_gemm(xp, wp, k, backend="interpret", config=BlockConfig(16, 16, 64)), oracle)
    xf = torch.randn(m, k, generator=g, dtype=torch.float32)
    out = ops.w1a16_gemm(xf, wp, k, torch.ones(n), backend="interpret", config=BlockConfig(16, 32, 128))
    torch.testing.assert_close(out.double(), xf.double() @ w.double().T, rtol=1e-5, atol=1e-4)


def test_strided_rows_are_honoured():
    # A row-strided view (stride(0) > K) is read in place, not copied.
    g = _gen("stride")
    m, n, k = 6, 5, 40
    big = _pm1(m, k + 24, gen=g)
    x = big[:, :k]
    w = _pm1(n, k, gen=g)
    xf = big.to(torch.float16)[:, :k]
    assert xf.stride(0) == k + 24
    out = ops.w1a16_gemm(xf, pack_binary(w), k, torch.ones(n), backend="interpret")
    torch.testing.assert_close(out.double(), x.double() @ w.double().T, rtol=2**-10, atol=1e-3)


def test_empty_batch():
    w = pack_binary(torch.ones(3, 10))
    out = ops.w1a16_gemm(torch.zeros(0, 10), w, 10, torch.ones(3), backend="interpret")
    assert out.shape == (0, 3)


def test_autotuned_launch_path(monkeypatch):
    # The GPU path launches through triton.autotune with a grid lambda; run that exact code
    # with interpreted kernels and one (small) candidate per family (no timing needed).
    from triton_kernels import configs

    for family, cfg in configs.INTERPRET.items():
        monkeypatch.setitem(configs.AUTOTUNE, family, [cfg])
    real = ops._run_autotuned
    monkeypatch.setattr(ops, "resolve_backend", lambda backend, device: "triton")
    monkeypatch.setattr(ops, "_run_autotuned", lambda name, fam, interpret, *a: real(name, fam, True, *a))
    ops._autotuned.cache_clear()
    try:
        g = _gen("autotune")
        m, n, k = 9, 11, 75
        x, w = _pm1(m, k, gen=g), _pm1(n, k, gen=g)
        xp, wp = pack_binary(x), pack_binary(w)
        oracle = (x.double() @ w.double().T).to(torch.int32)
        assert torch.equal(ops.xnor_gemm(xp, wp, k), oracle)
        assert torch.equal(ops.w1a1_int8_gemm(xp, wp, k), oracle)
        assert torch.equal(ops.w1a8_gemm(x.to(torch.int8), wp, k), oracle)
        xf = torch.randn(m, k, generator=g)
        wt = torch.randint(-1, 2, (n, k), generator=g)
        out = ops.w2a16_gemm(xf, pack_ternary(wt), k, torch.full((n,), 0.5), torch.ones(n))
        torch.testing.assert_close(out.double(), 0.5 * (xf.double() @ wt.double().T) + 1, rtol=1e-5, atol=1e-4)
    finally:
        ops._autotuned.cache_clear()
