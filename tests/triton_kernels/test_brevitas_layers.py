"""pack_model on real Brevitas quant layers (duck-typed: triton_kernels never imports brevitas)."""

import torch
from torch import nn

import brevitas.nn as qnn
from brevitas.quant import Int8ActPerTensorFloat, SignedBinaryActPerTensorConst, SignedBinaryWeightPerTensorConst

from triton_kernels.deploy import PackedConv2d, PackedLinear, pack_model


def test_brevitas_binary_layers():
    torch.manual_seed(0)
    model = nn.Sequential(
        qnn.QuantConv2d(3, 8, 3, padding=1, bias=False, weight_quant=SignedBinaryWeightPerTensorConst,
                        input_quant=Int8ActPerTensorFloat),
        nn.Flatten(),
        qnn.QuantLinear(8 * 4 * 4, 10, bias=True, weight_quant=SignedBinaryWeightPerTensorConst,
                        input_quant=SignedBinaryActPerTensorConst),
    ).eval()
    x = torch.randn(6, 3, 4, 4)
    with torch.no_grad():
        ref = model(x)
        report = pack_model(model)
        out = model(x)
    assert [(e.name, e.weight_bits, e.act_bits) for e in report.packed] == [("0", 1, 16), ("2", 1, 1)]
    assert isinstance(model[0], PackedConv2d) and model[0].input_quant is not None  # int8 quantizer kept
    assert isinstance(model[2], PackedLinear) and model[2].input_quant is None  # bipolar sign built in
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.argmax(1), ref.argmax(1))
