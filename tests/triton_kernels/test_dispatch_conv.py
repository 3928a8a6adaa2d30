"""packed_matmul (kernel choice + scale / bias) and packed_conv2d (im2col) against float64
oracles built from the unpacked values with plain torch ops."""

import pytest
import torch
import torch.nn.functional as F

from triton_kernels import ops
from triton_kernels.conv import packed_conv2d
from triton_kernels.dispatch import XNOR_MAX_M, choose_w1a1_kernel, packed_matmul
from triton_kernels.packing import pack_binary, pack_ternary


def _weights(n, k, ternary, g):
    w = torch.randint(-1, 2, (n, k), generator=g) if ternary else torch.randint(0, 2, (n, k), generator=g) * 2 - 1
    return w, (pack_ternary(w) if ternary else pack_binary(w))


def _sign(x):
    return torch.where(x >= 0, 1.0, -1.0).double()


def test_w1a1_choice_by_rows():
    assert choose_w1a1_kernel(1) == "xnor"
    assert choose_w1a1_kernel(XNOR_MAX_M) == "xnor"
    assert choose_w1a1_kernel(XNOR_MAX_M + 1) == "int8"


@pytest.mark.parametrize("m", [3, XNOR_MAX_M + 7])
@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_w1a1_matmul_routes_and_matches(m, backend, monkeypatch):
    g = torch.Generator().manual_seed(m)
    k, n = 45, 11
    w, wp = _weights(n, k, False, g)
    x = torch.randn(m, k, generator=g)
    x[0, :5] = 0.0  # sign(0) = +1
    scale, bias = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g)
    called = []
    for name in ("xnor_gemm", "w1a8_gemm"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _r=real, _n=name, **kw: called.append(_n) or _r(*a, **kw))
    y = packed_matmul(x, wp, k, scale, bias, weight_bits=1, act_bits=1, backend=backend)
    assert called == ["xnor_gemm" if m <= XNOR_MAX_M else "w1a8_gemm"]
    oracle = (_sign(x) @ w.double().T) * scale.double() + bias.double()
    torch.testing.assert_close(y.double(), oracle, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_other_precisions_and_leading_dims(backend):
    g = torch.Generator().manual_seed(5)
    k, n = 37, 6
    scale = torch.rand(n, generator=g) + 0.5
    wb, wpb = _weights(n, k, False, g)
    wt, wpt = _weights(n, k, True, g)
    x8 = torch.randint(-128, 128, (2, 3, k), generator=g, dtype=torch.int8)
    y8 = packed_matmul(x8, wpb, k, scale, act_bits=8, backend=backend)
    assert y8.shape == (2, 3, n) and y8.dtype == torch.float32
    torch.testing.assert_close(y8.double(), (x8.double() @ wb.double().T) * scale.double(), rtol=1e-6, atol=1e-4)
    xf = torch.randn(2, 3, k, generator=g)
    yt = packed_matmul(xf, wpt, k, scale, weight_bits=2, act_bits=1, backend=backend)
    torch.testing.assert_close(yt.double(), (_sign(xf) @ wt.double().T) * scale.double(), rtol=1e-6, atol=1e-5)
    yt8 = packed_matmul(x8, wpt, k, scale, weight_bits=2, act_bits=8, backend=backend)
    torch.testing.assert_close(yt8.double(), (x8.double() @ wt.double().T) * scale.double(), rtol=1e-6, atol=1e-3)
    yf = packed_matmul(xf, wpb, k, scale, act_bits=16, backend=backend)
    torch.testing.assert_close(yf.double(), (xf.double() @ wb.double().T) * scale.double(), rtol=1e-5, atol=1e-4)


CONV_CASES = [
    # (C, N, kernel, stride, padding, dilation, H, W)
    (3, 4, (3, 3), (1, 1), (0, 0), (1, 1), 6, 5),
    (3, 5, (3, 3), (1, 1), (1, 1), (1, 1), 5, 5),
    (2, 3, (3, 2), (2, 1), (1, 0), (1, 1), 7, 6),
    (4, 3, (3, 3), (1, 2), (2, 2), (2, 2), 6, 7),
    (5, 2, (1, 1), (1, 1), (0, 0), (1, 1), 3, 4),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("ternary", [False, True], ids=["binary", "ternary"])
@pytest.mark.parametrize("act_bits", [1, 16])
def test_conv2d_matches_torch(case, ternary, act_bits):
    c, n, ks, stride, padding, dilation, h, w_ = case
    g = torch.Generator().manual_seed(hash(case) % 1000 + act_bits)
    w, wp = _weights(n, c * ks[0] * ks[1], ternary, g)
    x = torch.randn(2, c, h, w_, generator=g)
    scale, bias = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g)
    y = packed_conv2d(x, wp, ks, scale, bias, stride=stride, padding=padding, dilation=dilation,
                      weight_bits=2 if ternary else 1, act_bits=act_bits)
    xin = _sign(x) if act_bits == 1 else x.double()
    w4 = (w.double() * scale.double()[:, None]).reshape(n, c, *ks)
    oracle = F.conv2d(xin, w4, bias.double(), stride=stride, padding=padding, dilation=dilation)
    assert y.shape == oracle.shape
    torch.testing.assert_close(y.double(), oracle, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("act_bits", [1, 16])
def test_conv2d_through_interpreted_kernels(act_bits):
    g = torch.Generator().manual_seed(11)
    c, n, ks = 3, 4, (3, 3)
    w, wp = _weights(n, c * 9, False, g)
    x = torch.randn(1, c, 5, 5, generator=g)
    y = packed_conv2d(x, wp, ks, torch.ones(n), padding=(1, 1), act_bits=act_bits, backend="interpret")
    xin = _sign(x) if act_bits == 1 else x.double()
    oracle = F.conv2d(xin, w.double().reshape(n, c, *ks), padding=1)
    torch.testing.assert_close(y.double(), oracle, rtol=1e-5, atol=1e-4)


def test_conv2d_input_checks():
    wp = pack_binary(torch.ones(2, 27))
    with pytest.raises(ValueError, match="4-D"):
        packed_conv2d(torch.zeros(3, 5, 5), wp, (3, 3), torch.ones(2))
    with pytest.raises(ValueError, match="smaller than the"):
        packed_conv2d(torch.zeros(1, 3, 2, 2), wp, (3, 3), torch.ones(2))
    with pytest.raises(ValueError, match="act_bits 1 or 16"):
        packed_conv2d(torch.zeros(1, 3, 5, 5), wp, (3, 3), torch.ones(2), act_bits=8)
