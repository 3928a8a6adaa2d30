"""The per-layer summary against counts done by hand on a small model."""

import pytest
import torch
from torch import nn

from lr_quant import freeze
from lr_quant.nn import LRQuantConv2d
from lr_quant.nn.stochastic_sign import StochasticSign
from lr_quant.quant import LRBinaryWeightPerChannelFloat, LRBinaryWeightPerTensorConst
from lr_quant.summary import model_summary


def small():
    return nn.Sequential(
        LRQuantConv2d(3, 8, 3, padding=1, bias=False, weight_quant=LRBinaryWeightPerChannelFloat),
        nn.BatchNorm2d(8),
        StochasticSign(8),
        LRQuantConv2d(8, 4, 3, stride=2, padding=1, groups=2, bias=True,
                      weight_quant=LRBinaryWeightPerTensorConst),
        nn.Flatten(),
        nn.Linear(36, 10))


def test_counts_match_hand_counts():
    model = small()
    freeze(model)
    s = model_summary(model, torch.randn(2, 3, 6, 6))
    rows = {r.name: r for r in s.rows}
    conv1, bn, conv2, fc = rows["0"], rows["1"], rows["3"], rows["5"]
    # conv1: 8 x 6 x 6 outputs, each 3 * 3 * 3 MACs; 216 binary weights + 8 float scales
    assert (conv1.macs, conv1.params, conv1.memory_bits) == (288 * 27, 216 + 8, 216 + 8 * 32)
    # float input: FINN's MVAU needs integer inputs (quantize the input first)
    assert (conv1.weight_bits, conv1.input_bits, conv1.finn) == (1, 32, "no: float input")
    # BN: weight, bias, running mean and var
    assert (bn.params, bn.memory_bits, bn.macs) == (32, 32 * 32, 0)
    assert bn.finn == "yes: thresholds"   # the sign reads it: FINN folds it into thresholds
    # conv2: groups 2, stride 2: 4 x 3 x 3 outputs, each (8 / 2) * 9 MACs; input is +-1
    assert (conv2.macs, conv2.params, conv2.memory_bits) == (36 * 36, 144 + 4, 144 + 4 * 32)
    assert (conv2.weight_bits, conv2.input_bits, conv2.finn) == (1, 1, "yes")
    assert (fc.macs, fc.params, fc.memory_bits, fc.weight_bits) == (360, 370, 370 * 32, 32)
    assert fc.finn.startswith("no")
    sign = [r for r in s.rows if r.kind == "StochasticSign"]   # one row, its threshold inside
    assert len(sign) == 1 and sign[0].params == 8
    t = s.totals
    assert t["params"] == 224 + 32 + 8 + 148 + 370
    assert t["memory_bytes"] == (472 + 1024 + 256 + 272 + 11840) / 8
    assert t["fp32_bytes"] == 4 * t["params"]
    assert t["compression"] == pytest.approx(4 * t["params"] / t["memory_bytes"])
    assert t["macs"] == 7776 + 1296 + 360
    assert t["binary_mac_share"] == pytest.approx((7776 + 1296) / 9432)
    assert t["xnor_mac_share"] == pytest.approx(1296 / 9432)


def test_finn_column_says_no_for_a_batchnorm_no_quantizer_reads():
    model = nn.Sequential(
        LRQuantConv2d(3, 8, 3, bias=False, weight_quant=LRBinaryWeightPerTensorConst),
        nn.BatchNorm2d(8), nn.ReLU(), nn.Identity(), StochasticSign(8), nn.BatchNorm2d(8),
        nn.Identity(), StochasticSign(8))
    rows = {r.name: r for r in model_summary(freeze(model), torch.randn(2, 3, 6, 6)).rows}
    # BN -> ReLU -> sign: FINN keeps the BN as float Mul/Add before the ReLU
    assert rows["1"].finn == "no: float Mul/Add"
    # BN -> Identity -> sign: the sign reads the very tensor, thresholds absorb the BN
    assert rows["5"].finn == "yes: thresholds"


def test_table_lists_every_row_and_the_totals():
    model = small()
    text = model_summary(model, torch.randn(1, 3, 6, 6)).table()
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["layer", "type", "W", "bits"]
    assert any(line.startswith("3 ") and "LRQuantConv2d" in line for line in lines)
    assert "compression x" in text and "XNOR (W1A1) MACs 13.7%" in text
    assert model.training   # the mode is restored


@pytest.mark.parametrize("recipe,bits", [("resnet_w1a1_stochastic", 1), ("resnet_w1a2", 2)])
def test_converted_layers_report_their_own_input_quantizer(recipe, bits):
    """A converted layer quantizes its input itself (input_quant): its input bits are the
    quantizer's (1 for the sign, 2 for ternary), not those of the float tensor it receives."""
    import timm

    from lr_quant.convert import convert_with_report

    model, report = convert_with_report(timm.create_model("test_resnet", num_classes=10), recipe)
    s = model_summary(model, torch.randn(1, 3, 32, 32))
    rows = {r.name: r for r in s.rows}
    assert all(rows[c.name].input_bits == bits for c in report.converted)
    first = model.pretrained_cfg["first_conv"]
    assert rows[first].input_bits == 32
    assert (s.totals["xnor_mac_share"] > 0.5) == (bits == 1)


@pytest.mark.parametrize("spec, bits", [
    ("lr_binary", 1), ("lr_ternary_per_channel", 2),
    ({"name": "lr_categorical", "values": [-3, -1, 1, 3]}, 2),      # 4 values: 2-bit indices
    ({"name": "lr_categorical", "values": [-2, -1, 0, 1, 2]}, 3),
])
def test_weight_bits_have_one_source(spec, bits):
    """The registry's precision, the distribution's and the summary's W bits agree."""
    from lr_quant.registry import get_weight_quantizer

    quantizer = get_weight_quantizer(spec)
    layer = LRQuantConv2d(4, 4, 3, bias=False, weight_quant=quantizer.injector)
    row = model_summary(nn.Sequential(layer), torch.randn(1, 4, 5, 5)).rows[0]
    assert quantizer.precision == layer.lr_distribution.precision == row.weight_bits == bits
