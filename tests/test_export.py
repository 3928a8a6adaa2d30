"""QONNX export of LR models: Brevitas' TorchScript exporter, qonnx execution as the oracle."""

import onnx
import pytest
import torch
from torch import nn

from lr_quant import freeze
from lr_quant.export import QONNXMismatchError, export_qonnx, run_qonnx, verify_qonnx
from lr_quant.nn import LRQuantConv2d, LRQuantLinear
from lr_quant.quant import (LRBinaryWeightPerChannelFloat, LRBinaryWeightPerTensorConst,
                            LRTernaryWeightPerChannelFloat, LRTernaryWeightPerTensorConst,
                            lr_weight_quant)


def graph_ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def quant_nodes(path):
    return [n for n in onnx.load(str(path)).graph.node if n.op_type in ("Quant", "BipolarQuant")]


def train_a_little(model, x, steps=3):
    """A few LR steps so that logits, scales and BN statistics are not at their init."""
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("quant, expected_op, bits", [
    (LRBinaryWeightPerTensorConst, "BipolarQuant", None),
    (LRBinaryWeightPerChannelFloat, "BipolarQuant", None),
    (LRTernaryWeightPerTensorConst, "Quant", 2),
    (LRTernaryWeightPerChannelFloat, "Quant", 2),
])
def test_one_layer_export_matches_qonnx_execution(tmp_path, quant, expected_op, bits):
    torch.manual_seed(0)
    model = nn.Sequential(LRQuantLinear(12, 5, weight_quant=quant))
    x = torch.randn(4, 12)
    train_a_little(model, x)
    freeze(model)
    path = export_qonnx(model, x, tmp_path / "one.onnx", require_frozen=True)
    ops = graph_ops(path)
    assert "IntQuant" not in ops
    nodes = quant_nodes(path)
    assert [n.op_type for n in nodes] == [expected_op]
    if bits is not None:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
        assert attrs["narrow"] == 1 and attrs["signed"] == 1
        init = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
        assert float(init[nodes[0].input[3]]) == bits
    inputs = [x] + [torch.randn(4, 12) for _ in range(3)]
    err = verify_qonnx(path, model, inputs)
    assert err < 1e-4


@pytest.mark.parametrize("quant", [
    LRBinaryWeightPerChannelFloat, LRTernaryWeightPerTensorConst,
    lr_weight_quant({"name": "categorical", "values": (-2, -1, 0, 1, 2)}, per_channel_scale=True),
], ids=["binary-pc", "ternary", "quinary-pc"])
def test_two_layer_conv_model_export(tmp_path, quant):
    torch.manual_seed(1)
    model = nn.Sequential(
        LRQuantConv2d(3, 8, 3, padding=1, bias=False, weight_quant=quant),
        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        LRQuantLinear(32, 10, weight_quant=quant))
    x = torch.randn(4, 3, 8, 8)
    train_a_little(model, x)
    freeze(model)
    path = export_qonnx(model, x, tmp_path / "two.onnx")
    assert "IntQuant" not in graph_ops(path)
    assert len(quant_nodes(path)) == 2
    err = verify_qonnx(path, model, [x, torch.randn(4, 3, 8, 8)])
    # float rounding level: outputs are O(1..10), conv + BN + linear in float32
    assert err < 1e-4


def test_unfrozen_export_is_refused_when_required(tmp_path):
    model = nn.Sequential(LRQuantLinear(4, 2))
    with pytest.raises(ValueError, match=r"unfrozen LR layers \['0'\]"):
        export_qonnx(model, torch.randn(1, 4), tmp_path / "m.onnx", require_frozen=True)


def test_verify_detects_a_mismatch(tmp_path):
    model = nn.Sequential(LRQuantLinear(6, 3))
    x = torch.randn(2, 6)
    freeze(model)
    path = export_qonnx(model, x, tmp_path / "m.onnx")
    with torch.no_grad():
        model[0].bias.add_(1.0)  # the PyTorch model no longer matches the file
    with pytest.raises(QONNXMismatchError, match="differs from PyTorch by up to 1"):
        verify_qonnx(path, model, [x])
    assert run_qonnx(path, x.numpy()).shape == (2, 3)
    with pytest.raises(ValueError, match=r"input of shape \(5, 6\) does not fit .* \(2, 6\)"):
        run_qonnx(path, torch.randn(5, 6).numpy())


def test_export_restores_training_mode(tmp_path):
    model = nn.Sequential(LRQuantLinear(4, 2)).train()
    export_qonnx(model, torch.randn(1, 4), tmp_path / "m.onnx")
    assert model.training
    with pytest.raises(TypeError, match="example_input must be a tensor"):
        export_qonnx(model, [1, 2, 3, 4], tmp_path / "m.onnx")
