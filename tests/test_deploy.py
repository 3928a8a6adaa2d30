"""A frozen LR timm ResNet, packed to 1-bit weights, predicts exactly like the frozen model."""

import pytest
import timm
import torch
from brevitas.graph.quantize import layerwise_quantize
from torch import nn

from lr_quant import freeze
from lr_quant.deploy import pack
from lr_quant.nn import LRQuantConv2d, lr_layers
from lr_quant.quant import LRBinaryWeightPerChannelFloat, LRTernaryWeightPerChannelFloat
from triton_kernels import PackedConv2d


@pytest.mark.slow
@pytest.mark.parametrize("quant", [LRBinaryWeightPerChannelFloat, LRTernaryWeightPerChannelFloat],
                         ids=["binary", "ternary"])
def test_packed_lr_resnet_matches_frozen_model(quant):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    layer_map = {nn.Conv2d: (LRQuantConv2d, {"weight_quant": quant, "return_quant_tensor": False})}
    # first conv and classifier stay in full precision (timm's pretrained_cfg names them)
    keep = [model.pretrained_cfg["first_conv"], model.pretrained_cfg["classifier"]]
    model = layerwise_quantize(model, compute_layer_map=layer_map, name_blacklist=keep)
    assert len(lr_layers(model)) >= 10
    x = torch.randn(8, 3, 32, 32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(2):  # move logits, scales and BN statistics away from their init
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), torch.arange(8)).backward()
        opt.step()
    freeze(model)
    model.eval()
    num_lr = len(lr_layers(model))
    with torch.no_grad():
        frozen = model(x)
        report = pack(model)
        packed = model(x)
    assert len(report.packed) == num_lr and not lr_layers(model)
    assert sum(isinstance(m, PackedConv2d) for m in model.modules()) == num_lr
    assert torch.equal(packed.argmax(1), frozen.argmax(1))
    torch.testing.assert_close(packed, frozen, rtol=1e-4, atol=1e-4 * frozen.abs().max().item())


def test_pack_refuses_unfrozen_lr_layers():
    model = nn.Sequential(LRQuantConv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"LR layers \['0'\] are not frozen"):
        pack(model)


@pytest.mark.parametrize("recipe,act_bits", [("resnet_w1a1_stochastic", 1), ("resnet_w1a2", 16)])
def test_packed_converted_resnet_with_quantized_activations(recipe, act_bits):
    """Sign inputs run the 1-bit activation kernels; ternary inputs keep their threshold +
    quantizer in front of the W1A16 kernel ({-1, 0, +1} x +-1 is exact in fp16)."""
    from lr_quant.convert import convert_with_report
    from lr_quant.quant.threshold import calibrate_thresholds

    torch.manual_seed(0)
    model, report = convert_with_report(timm.create_model("test_resnet", num_classes=10), recipe)
    x = torch.randn(4, 3, 32, 32)
    calibrate_thresholds(model, x)
    model.train()
    model(x)   # BN statistics of a training pass
    freeze(model)
    model.eval()
    with torch.no_grad():
        frozen = model(x)
        packed_report = pack(model)
        packed = model(x)
    assert len(packed_report.packed) == len(report.converted)
    assert {e.act_bits for e in packed_report.packed} == {act_bits}
    if act_bits == 16:
        assert all(m.input_quant is not None for m in model.modules()
                   if isinstance(m, PackedConv2d))
    assert torch.equal(packed.argmax(1), frozen.argmax(1))
    torch.testing.assert_close(packed, frozen, rtol=1e-4, atol=1e-4 * frozen.abs().max().item())
