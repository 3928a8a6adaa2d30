"""Packed ops that must refuse wrong shapes instead of returning wrong values (issue 15,
item 7): the true K / channel count is checked, kernel_size / stride / padding take ints,
non-positive strides and dilations are refused by name."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from triton_kernels import ops
from triton_kernels.conv import packed_conv2d
from triton_kernels.deploy import PackedConv2d, pack_model
from triton_kernels.packing import pack_binary, pack_bits, pack_ternary


def _binary(*shape, g):
    return (torch.randint(0, 2, shape, generator=g) * 2 - 1).float()


def _packed_conv(g, c=4, n=6):
    w = _binary(n, c, 3, 3, g=g)
    return w, pack_binary(w.reshape(n, -1))


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_xnor_gemm_refuses_a_k_other_than_the_packed_length(backend):
    g = torch.Generator().manual_seed(0)
    x, w = _binary(2, 70, g=g), _binary(3, 70, g=g)
    xp, wp = pack_binary(x), pack_binary(w)          # 3 words each, like K = 90 would be
    torch.testing.assert_close(ops.xnor_gemm(xp, wp, 70, backend=backend),
                               (x @ w.T).to(torch.int32))
    with pytest.raises(ValueError, match=r"k=90.*packed from K=70"):
        ops.xnor_gemm(xp, wp, 90, backend=backend)
    with pytest.raises(ValueError, match=r"k=90.*packed from K=70"):
        ops.xnor_gemm(xp.clone(), wp, 90, backend=backend)   # the weight alone still knows
    with pytest.raises(ValueError, match=r"x_packed.*packed from K=70"):
        ops.w1a1_int8_gemm(xp, pack_binary(_binary(3, 90, g=g)), 90, backend=backend)
    with pytest.raises(ValueError, match=r"K alignment: k=100 needs ceil\(k/32\)=4 words"):
        ops.xnor_gemm(xp.clone(), wp.clone(), 100, backend=backend)   # more than 3 words hold


def test_fp_gemms_check_the_packed_length_too():
    g = torch.Generator().manual_seed(1)
    wp = pack_ternary(torch.randint(-1, 2, (3, 36), generator=g).float())
    with pytest.raises(ValueError, match=r"k=45.*packed from K=36"):
        ops.w2a16_gemm(torch.randn(2, 45), wp, 45, torch.ones(3))
    with pytest.raises(ValueError, match=r"k=45.*packed from K=36"):
        ops.w1a8_gemm(torch.zeros(2, 45, dtype=torch.int8), pack_bits(torch.ones(3, 36)), 45)


def test_packed_conv2d_refuses_an_input_with_other_channels():
    g = torch.Generator().manual_seed(2)
    w, wp = _packed_conv(g)                       # 4 channels: K = 36, 2 words (so is 5 * 9)
    scale = torch.ones(6)
    with pytest.raises(ValueError, match=r"k=45.*packed from K=36"):
        packed_conv2d(torch.randn(1, 5, 6, 6), wp, (3, 3), scale)
    with pytest.raises(ValueError, match=r"5 channels.*in_channels=4"):
        packed_conv2d(torch.randn(1, 5, 6, 6), wp.clone(), (3, 3), scale, in_channels=4)


def test_packed_conv2d_layer_refuses_an_input_with_other_channels():
    g = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(_binary(6, 4, 3, 3, g=g))
    model = nn.Sequential(conv).eval()
    x = torch.randn(2, 4, 6, 6, generator=g)
    ref = model(x)
    pack_model(model)
    assert isinstance(model[0], PackedConv2d)
    torch.testing.assert_close(model(x), ref)
    with pytest.raises(ValueError, match=r"5 channels.*in_channels=4"):
        model(torch.randn(2, 5, 6, 6))
    model.load_state_dict(model.state_dict())              # a reload keeps the check
    with pytest.raises(ValueError, match=r"5 channels.*in_channels=4"):
        model(torch.randn(2, 5, 6, 6))


def test_packed_conv2d_takes_int_kernel_size_stride_padding():
    g = torch.Generator().manual_seed(4)
    w, wp = _packed_conv(g)
    x = torch.randn(2, 4, 7, 7, generator=g)
    scale = torch.rand(6, generator=g) + 0.5
    out = packed_conv2d(x, wp, 3, scale, stride=2, padding=1, dilation=1)
    ref = F.conv2d(x, w * scale.view(-1, 1, 1, 1), stride=2, padding=1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    layer = PackedConv2d(4, 6, 3, stride=2, padding=1)
    assert layer.kernel_size == (3, 3) and layer.stride == (2, 2)


@pytest.mark.parametrize("arg, value", [("stride", 0), ("stride", (1, -1)), ("dilation", 0),
                                        ("padding", -1), ("kernel_size", 0)])
def test_non_positive_geometry_is_refused_by_name(arg, value):
    g = torch.Generator().manual_seed(5)
    _, wp = _packed_conv(g)
    kwargs = {"kernel_size": 3, arg: value}
    with pytest.raises(ValueError, match=arg):
        packed_conv2d(torch.randn(1, 4, 6, 6), wp, kwargs.pop("kernel_size"), torch.ones(6),
                      **kwargs)
    layer_kwargs = {"kernel_size": 3, arg: value}
    with pytest.raises(ValueError, match=arg):
        PackedConv2d(4, 6, layer_kwargs.pop("kernel_size"), **layer_kwargs)


def test_malformed_geometry_is_refused_by_name():
    g = torch.Generator().manual_seed(6)
    _, wp = _packed_conv(g)
    for kwargs in ({"stride": (1, 2, 3)}, {"padding": "same"}, {"stride": 1.5}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            packed_conv2d(torch.randn(1, 4, 6, 6), wp, 3, torch.ones(6), **kwargs)
