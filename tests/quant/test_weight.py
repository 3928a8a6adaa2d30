"""LR weight quantizers: Brevitas injectors tagged with a distribution."""

import pytest
import torch
from brevitas.nn import QuantConv2d, QuantLinear
from brevitas.quant import Int8WeightPerTensorFloat

from lr_quant.distributions import CategoricalDistribution, TernaryDistribution
from lr_quant.quant import (LRBinaryWeightPerChannelFloat, LRBinaryWeightPerTensorConst,
                            LRTernaryWeightPerChannelFloat, LRTernaryWeightPerTensorConst,
                            distribution_from_quantizer, integer_grid, is_lr_weight_quant,
                            lr_weight_quant)


@pytest.mark.parametrize("values, unit, ints, bits", [
    ((-1, 1), 1.0, (-1, 1), 1),
    ((-0.5, 0.5), 0.5, (-1, 1), 1),
    ((-1, 0, 1), 1.0, (-1, 0, 1), 2),
    ((-2, -1, 0, 1, 2), 1.0, (-2, -1, 0, 1, 2), 3),
    ((-3, -1, 1, 3), 1.0, (-3, -1, 1, 3), 3),
    ((-1, -1 / 3, 1 / 3, 1), 1 / 3, (-3, -1, 1, 3), 3),
    ((0, 1), 1.0, (0, 1), 2),
])
def test_integer_grid(values, unit, ints, bits):
    got_unit, got_ints, got_bits = integer_grid(values)
    assert got_unit == pytest.approx(unit) and got_ints == ints and got_bits == bits
    # the grid reproduces the values
    assert [got_unit * i for i in got_ints] == pytest.approx([float(v) for v in values])


def test_integer_grid_errors():
    with pytest.raises(ValueError, match="not on a rational integer grid|bit integers"):
        integer_grid((-1.0, 2 ** 0.5))
    with pytest.raises(ValueError, match="not on a rational integer grid"):
        integer_grid((-1.0, 1e-9 * 2 ** 0.5))
    with pytest.raises(ValueError, match="needs 10-bit integers"):
        integer_grid((-300.0, 1.0))


@pytest.mark.parametrize("quant, values", [
    (LRBinaryWeightPerTensorConst, (-1.0, 1.0)),
    (LRBinaryWeightPerChannelFloat, (-1.0, 1.0)),
    (LRTernaryWeightPerTensorConst, (-1.0, 0.0, 1.0)),
    (LRTernaryWeightPerChannelFloat, (-1.0, 0.0, 1.0)),
])
def test_stock_brevitas_layer_quantizes_to_the_value_set(quant, values):
    """A stock QuantConv2d with an LR quantizer is a plain discrete-weight layer."""
    conv = QuantConv2d(3, 5, 3, bias=False, weight_quant=quant)
    qw = conv.quant_weight()
    scale = qw.scale
    ints = torch.round(qw.value / scale)
    assert set(ints.unique().tolist()) <= set(values)
    torch.testing.assert_close(qw.value, ints * scale)
    per_channel = "PerChannel" in quant.__name__
    assert scale.numel() == (5 if per_channel else 1)
    assert int(qw.bit_width) == (1 if len(values) == 2 else 2)
    # the quantizer must not edit the float weight in place (Brevitas' const binary does)
    before = conv.weight.detach().clone()
    conv.quant_weight()
    torch.testing.assert_close(conv.weight.detach(), before)


def test_lr_weight_quant_for_categorical():
    quant = lr_weight_quant({"name": "categorical", "values": (-1.0, -1 / 3, 1 / 3, 1.0)})
    layer = QuantLinear(4, 3, bias=False, weight_quant=quant)
    qw = layer.quant_weight()
    assert int(qw.bit_width) == 3
    assert float(qw.scale) == pytest.approx(1 / 3)
    dist = distribution_from_quantizer(layer.weight_quant)
    assert isinstance(dist, CategoricalDistribution) and dist.values[1] == pytest.approx(-1 / 3)
    assert lr_weight_quant("ternary").bit_width == 2
    assert isinstance(distribution_from_quantizer(lr_weight_quant("ternary", True)), TernaryDistribution)


def test_non_lr_quantizer_is_rejected():
    assert not is_lr_weight_quant(Int8WeightPerTensorFloat)
    assert is_lr_weight_quant(LRTernaryWeightPerTensorConst)
    with pytest.raises(TypeError, match="not an LR weight quantizer"):
        distribution_from_quantizer(Int8WeightPerTensorFloat)
    with pytest.raises(ValueError, match="unknown weight distribution"):
        lr_weight_quant("septenary")
