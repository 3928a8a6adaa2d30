"""The FINN form (recipe ``finn: true``): quantizers on the tensors they quantize.

Oracles: the values every quantized layer and every residual add reads in eval (they must
be exactly ternary: what makes FINN's datapath integer), the stem pool recomputed by hand
from the thresholds (signed ternary, max-pool padded with -inf), qonnx execution of the
export, and the error messages naming the module where the form is impossible.
"""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
from brevitas.nn import QuantIdentity
from torch import nn
from torch.overrides import TorchFunctionMode

from lr_quant.convert import calibrate_thresholds, convert_with_report
from lr_quant.convert.finn_form import FinnFormError
from lr_quant.export import export_qonnx
from lr_quant.nn import GridRequant, LRWeightMixin
from lr_quant.quant.activation import StochasticUnsignedTernaryQuant
from lr_quant.quant.threshold import UnsignedTernaryThreshold
from lr_quant.recipe import Recipe

TERNARY = {-1.0, 0.0, 1.0}


def finn_recipe(**changes) -> Recipe:
    spec = dict(finn=True, weights=dict(conv="lr_binary", linear="lr_binary_per_channel",
                                        bias_before_norm="fold"),
                activations=dict(quantizer="stochastic_ternary", input_quantizer="int8"),
                keep_fp=dict(first_conv=False, classifier=False), data=dict(image_size=32))
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            spec.setdefault(section, {})[field] = value
        else:
            spec[section] = value
    return Recipe.from_dict(spec)


def tiny_resnet(trained_norms: bool = True, **kwargs) -> nn.Module:
    """A small timm resnet10t; `trained_norms`: BatchNorms as after training (a fresh timm
    ResNet has bn2.weight = 0 in every block: zero_init_last)."""
    torch.manual_seed(0)
    kw = dict(avg_down=False, stem_width=8, channels=[8, 16, 16, 16])
    kw.update(kwargs)
    model = timm.create_model("resnet10t", num_classes=5, **kw)
    with torch.no_grad():
        for m in model.modules():
            if trained_norms and isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return model


@functools.lru_cache(maxsize=1)
def _converted_once():
    model, report = convert_with_report(tiny_resnet(), finn_recipe())
    x = torch.randn(16, 3, 32, 32)
    calibrate_thresholds(model, x)
    return model.eval(), report, x


def _converted():
    """The converted tiny resnet10t (a copy per test: some train it), its report and a
    calibration batch."""
    return copy.deepcopy(_converted_once())


class _Adds(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.operands = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("add", "__add__", "__iadd__", "add_"):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if len(tensors) == 2 and tensors[0].dim() == 4 and \
                    tensors[0].shape == tensors[1].shape:     # the residual adds
                self.operands.append([t.detach().clone() for t in tensors])
        return func(*args, **(kwargs or {}))


def test_timm_resnet_every_quantized_layer_and_every_add_reads_ternary_values():
    model, report, x = _converted()
    assert not [m for m in model.modules() if isinstance(m, nn.ReLU)]   # all became quantizers
    assert all(r.converted for r in report.layers)
    seen = {}

    def grab(name):
        def hook(module, args):
            seen[name] = args[0].detach()
        return hook

    layers = {n: m for n, m in model.named_modules() if isinstance(m, LRWeightMixin)}
    handles = [m.register_forward_pre_hook(grab(n)) for n, m in layers.items()]
    adds = _Adds()
    with torch.no_grad(), adds:
        model(x)
    for h in handles:
        h.remove()
    # the first conv reads the network input through its int8 quantizer; the others read
    # ternary tensors and have no input quantizer of their own
    assert model.conv1[0].input_quant.is_quant_enabled
    for name, layer in layers.items():
        if name in ("conv1.0", "fc"):
            continue
        assert not layer.input_quant.is_quant_enabled, name
        assert set(seen[name].unique().tolist()) <= TERNARY, name
    # the classifier reads the global average of the last block's ternary output
    hw = 1   # 32x32 input: the last stage is 1x1
    assert set((seen["fc"] * hw).unique().tolist()) <= TERNARY
    # four residual adds, each of two ternary tensors
    assert len(adds.operands) == 4
    for a, b in adds.operands:
        assert set(a.unique().tolist()) <= TERNARY and set(b.unique().tolist()) <= TERNARY


def test_stem_unsigned_quantizer_pool_and_requantizer_equal_the_pooled_signed_ternary():
    """act1 -> {0, 1, 2}, max-pool (padded), x - 1: the same as pooling the signed ternary
    of the same thresholds with -inf padding (recomputed here from the thresholds)."""
    model, _, x = _converted()
    act1 = model.act1
    proxy = act1.act_quant.fused_activation_quant_proxy
    assert isinstance(proxy.activation_impl, UnsignedTernaryThreshold)
    assert isinstance(proxy.tensor_quant, StochasticUnsignedTernaryQuant)
    pool, requant = model.maxpool
    assert isinstance(requant, GridRequant) and requant.offset == 1.0
    with torch.no_grad():
        stem = model.bn1(model.conv1(x))
        got = model.maxpool(act1(stem))
        th = proxy.activation_impl
        c, t = th.threshold.view(1, -1, 1, 1), th.half_width.abs().view(1, -1, 1, 1)
        signed = torch.clamp(torch.round((stem - c) * 0.5 / t), -1, 1)
        expected = nn.functional.max_pool2d(signed, 3, 2, 1)
    assert set(act1(stem).unique().tolist()) <= {0.0, 1.0, 2.0}
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_residual_operands_are_quantized_where_they_are_produced():
    model, report, _ = _converted()
    for block in (model.layer1[0], model.layer2[0], model.layer3[0], model.layer4[0]):
        assert isinstance(block.bn2, nn.Sequential) and isinstance(block.bn2[0], nn.BatchNorm2d)
        assert isinstance(block.bn2[1], QuantIdentity)
        assert isinstance(block.downsample[-1][-1], QuantIdentity)
        assert isinstance(block.act1, QuantIdentity) and isinstance(block.act2, QuantIdentity)
    assert any("after layer1.0.bn2 (read by the add in layer1.0)" in n for n in report.notes)


def test_finn_form_exports_and_qonnx_reproduces_it(tmp_path):
    model, _, x = _converted()
    grid = torch.randint(-128, 128, (2, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    inputs = grid.float() / 128
    result = export_qonnx(model, inputs[:1], tmp_path / "m.onnx",
                          check_inputs=[inputs[i:i + 1] for i in range(2)])
    assert result.max_abs_error <= 1e-5


def test_trains_with_moments_through_the_adds():
    model, _, x = _converted()
    model.train()
    out = model(x[:4])
    loss = nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for block in (model.layer1[0], model.layer4[0]):
        for q in (block.act1, block.bn2[1], block.act2):
            th = q.act_quant.fused_activation_quant_proxy.activation_impl
            assert th.threshold.grad is not None and th.threshold.grad.abs().sum() > 0
    assert model.fc.weight_logits.grad.abs().sum() > 0


def test_untrained_zero_init_norm_before_a_quantizer_is_reported():
    _, report = convert_with_report(tiny_resnet(trained_norms=False), finn_recipe())
    assert any("layer1.0.bn2 has weight 0 (timm's zero_init_last" in n for n in report.notes)


@pytest.mark.parametrize("model, recipe, match", [
    (lambda: tiny_resnet(avg_down=True), finn_recipe(),
     r"layer2\.0\.downsample\.1: reads layer2\.0\.downsample\.0 \(AvgPool2d\)"),
    (tiny_resnet, finn_recipe(**{"keep_fp.first_conv": True}),
     r"conv1\.0 stays in float \(first conv"),
    (tiny_resnet, finn_recipe(**{"activations.quantizer": "stochastic_sign"}),
     r"residual add with binary \(sign\) activations"),
    (tiny_resnet, finn_recipe(**{"activations.quantizer": None}),
     r"needs activations.quantizer"),
])
def test_impossible_models_are_refused_naming_the_module(model, recipe, match):
    with pytest.raises(FinnFormError, match=match):
        convert_with_report(model(), recipe)


class _SharedRelu(nn.Module):
    """torchvision's BasicBlock style: one ReLU module called twice."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_a_shared_activation_module_is_refused():
    with pytest.raises(FinnFormError, match=r"relu: one activation module called 2 times"):
        convert_with_report(_SharedRelu(), finn_recipe())


class _PlainCnv(nn.Module):
    """conv -> BN -> ReLU -> unpadded max-pool, twice, then a linear layer (CNV-like)."""

    def __init__(self, padding=0):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), \
            nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 8, 3, padding=padding, bias=False), \
            nn.BatchNorm2d(8), nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * 5 * 5 if padding else 8 * 4 * 4, 4)   # 24x24 input

    def forward(self, x):
        x = self.pool1(self.act1(self.bn1(self.conv1(x))))
        x = self.pool2(self.act2(self.bn2(self.conv2(x))))
        return self.fc(self.flatten(x))


def test_plain_cnn_with_signs_takes_the_form_and_padded_sign_convs_are_refused():
    recipe = finn_recipe(**{"activations.quantizer": "stochastic_sign", "data.image_size": 24})
    model, report = convert_with_report(_PlainCnv(), recipe)
    x = torch.randn(8, 3, 24, 24)
    calibrate_thresholds(model, x)
    seen = {}
    model.fc.register_forward_pre_hook(lambda m, a: seen.setdefault("fc", a[0]))
    model.conv2.register_forward_pre_hook(lambda m, a: seen.setdefault("conv2", a[0]))
    with torch.no_grad():
        model.eval()(x)
    assert set(seen["conv2"].unique().tolist()) <= {-1.0, 1.0}
    assert set(seen["fc"].unique().tolist()) <= {-1.0, 1.0}
    assert not [m for m in model.modules() if isinstance(m, GridRequant)]   # no padded pools
    with pytest.raises(FinnFormError, match=r"conv2: a padded conv reading binary"):
        convert_with_report(_PlainCnv(padding=1), recipe)


def test_summary_reads_the_ternary_tensors_as_two_bit_inputs():
    """The summary's rules on the FINN form: every conv after the first reads a ternary
    tensor directly (no input quantizer of its own): A bits from its values, FINN "yes";
    a block output quantizer reads a sum of two ternary tensors (3 bits); every BatchNorm
    is read by a quantizer: "yes: thresholds"; each quantizer is one row."""
    from lr_quant.summary import model_summary

    model, _, x = _converted()
    rows = {r.name: r for r in model_summary(model, x).rows}
    convs = [r for n, r in rows.items() if r.kind == "LRQuantConv2d" and n != "conv1.0"]
    assert len(convs) == 14
    # values seen: {-1, 0, 1} (2 bits), or only +-1 in this batch (1 bit)
    assert all(r.input_bits in (1, 2) and r.finn == "yes" for r in convs)
    assert sum(r.input_bits == 2 for r in convs) >= 10
    assert rows["conv1.0"].input_bits == 8
    assert all(r.finn == "yes: thresholds" for r in rows.values() if r.kind == "BatchNorm2d")
    assert rows["layer1.0.act2"].kind == "QuantIdentity" and rows["layer1.0.act2"].input_bits == 3
