"""Meta-device construction of LR layers (issue 15, item 9): parameters on meta, then
``to_empty()`` + ``reset_parameters()`` initializes them like a normal construction."""

import itertools

import pytest
import torch
from brevitas.graph.quantize import layerwise_quantize
from torch import nn

from lr_quant.nn import LRQuantConv2d, LRQuantLinear
from lr_quant.quant import (LRBinaryWeightPerChannelFloat, LRBinaryWeightPerTensorConst,
                            LRTernaryWeightPerChannelFloat, LRTernaryWeightPerTensorConst)

QUANTS = [LRBinaryWeightPerTensorConst, LRBinaryWeightPerChannelFloat,
          LRTernaryWeightPerTensorConst, LRTernaryWeightPerChannelFloat]
LAYERS = {
    "conv": (lambda **kw: LRQuantConv2d(4, 8, 3, padding=1, **kw), (2, 4, 6, 6)),
    "linear": (lambda **kw: LRQuantLinear(12, 5, **kw), (3, 12)),
}


def _tensors(layer):
    return itertools.chain(layer.parameters(), layer.buffers())


@pytest.mark.parametrize("quant", QUANTS, ids=["bin", "bin-pc", "ter", "ter-pc"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_meta_then_to_empty_and_reset_equals_a_normal_construction(quant, kind):
    build, shape = LAYERS[kind]
    torch.manual_seed(0)
    reference = build(weight_quant=quant)
    layer = build(weight_quant=quant, device="meta")
    assert all(t.is_meta for t in _tensors(layer))           # nothing allocated
    layer.eval().train()                                      # mode switches work on meta
    layer.to_empty(device="cpu")
    with torch.no_grad():                                     # to_empty leaves garbage
        for t in _tensors(layer):
            t.fill_(float("nan") if t.is_floating_point() else 1)
    torch.manual_seed(0)
    layer.reset_parameters()
    state, expected = layer.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(state[name], expected[name], msg=name)
    for (name, a), (_, b) in zip(layer.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(a, b, msg=name)            # non-persistent ones too
    x = torch.randn(shape)
    layer.eval(), reference.eval()
    out = layer(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(x))
    layer.train()
    assert torch.isfinite(layer(x)).all()


def test_reset_parameters_redraws_a_trained_layer():
    torch.manual_seed(0)
    layer = LRQuantLinear(6, 4, weight_quant=LRTernaryWeightPerChannelFloat)
    reference = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        layer.weight_logits.add_(3.0)
    layer.freeze()
    torch.manual_seed(0)
    layer.reset_parameters()
    assert not layer.is_lr_frozen
    for name, value in reference.items():
        torch.testing.assert_close(layer.state_dict()[name], value, msg=name)


def test_brevitas_layerwise_quantize_still_loads_through_meta():
    """Brevitas' rewriter builds with device="meta" and loads the float state with
    assign=True: every tensor ends up real, the non-persistent quantizer buffers too."""
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    layer_map = {nn.Linear: (LRQuantLinear, {"weight_quant": LRTernaryWeightPerTensorConst,
                                             "return_quant_tensor": False})}
    converted = layerwise_quantize(model, compute_layer_map=layer_map)
    assert not any(t.is_meta for t in _tensors(converted))
    converted.eval()
    assert torch.isfinite(converted(torch.randn(4, 6))).all()
