"""Conversion faults (issue 15, items 5 and 6): layers whose weight the model reads
outside the layer's forward, and modules registered under several names."""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lr_quant.convert import convert_with_report
from lr_quant.nn import LRWeightMixin


def _tiny_beit():
    return timm.create_model("beit_base_patch16_224", pretrained=False, depth=1, embed_dim=32,
                             num_heads=2, img_size=32, num_classes=10)


def test_beit_qkv_read_through_f_linear_is_kept_float_with_the_reason():
    """BEiT's attention computes F.linear(x, self.qkv.weight, qkv_bias): an LR layer there
    would never be called, so its logits would neither train nor reach eval."""
    model, report = convert_with_report(_tiny_beit(), "resnet_w1")
    row = report["blocks.0.attn.qkv"]
    assert not row.converted
    assert "F.linear" in row.reason and "blocks.0.attn" in row.reason
    assert not isinstance(model.blocks[0].attn.qkv, LRWeightMixin)
    # the layers called through their forward still convert, and every converted layer trains
    assert report["blocks.0.attn.proj"].converted and report["blocks.0.mlp.fc1"].converted
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    for name, module in model.named_modules():
        if isinstance(module, LRWeightMixin):
            grad = module.weight_logits.grad
            assert grad is not None and grad.abs().sum() > 0, name


class _Functional(nn.Module):
    """Reads its children's weights with F.linear / F.conv2d instead of calling them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.called = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = F.conv2d(x, self.conv.weight, self.conv.bias, padding=1)
        x = self.called(x).mean((2, 3))
        return F.linear(x, self.fc.weight.T.T)      # a transposed view is caught too


def test_direct_weight_reads_are_found_without_activation_quantization():
    """The check runs for every conversion (a weight-only recipe has no other trace)."""
    model, report = convert_with_report(_Functional(), {})
    assert not report["conv"].converted and "F.conv2d" in report["conv"].reason
    assert not report["fc"].converted
    assert report["called"].converted
    assert type(model.conv) is nn.Conv2d and type(model.fc) is nn.Linear


def test_the_check_does_not_touch_the_global_rng():
    """Its random example input must not shift a seeded training run."""
    model = _Functional()
    state = torch.get_rng_state()
    _, report = convert_with_report(model, {"keep_fp": {"names": ["called"]}})
    assert not report.converted                      # nothing built: only the check ran
    assert not report["conv"].converted and "F.conv2d" in report["conv"].reason
    assert torch.equal(torch.get_rng_state(), state)


def test_model_the_default_input_does_not_fit_still_converts_with_a_note():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="skipped.*pass example_input"):
        _, report = convert_with_report(model, {})
    assert report["0"].converted and report["2"].converted
    assert any("example_input" in n for n in report.notes)


def _tiny_coat():
    return timm.create_model("coat_lite_tiny", pretrained=False, embed_dims=(16, 16, 16, 16),
                             serial_depths=(1, 1, 1, 1), num_heads=8, mlp_ratios=(2, 2, 2, 2),
                             img_size=32, num_classes=10)


def test_coat_lite_shared_positional_conv_is_kept_and_reported():
    x = torch.randn(2, 3, 32, 32)
    model, report = convert_with_report(_tiny_coat(), "resnet_w1", example_input=x)
    shared = [r for r in report.layers if "shared" in r.reason]
    assert shared and not any(r.converted for r in shared)
    row = report["cpe1.proj"]
    assert "cpe1.proj" in row.reason and "serial_blocks1.0.cpe.proj" in row.reason
    assert model.serial_blocks1[0].cpe is model.cpe1
    assert type(model.cpe1.proj) is nn.Conv2d
    assert report.converted           # the rest converts
    model.eval()
    assert torch.isfinite(model(x)).all()


class _TwoParents(nn.Module):
    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(4, 4, 3, padding=1)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Sequential(conv, nn.ReLU())
        self.b = nn.Sequential(conv)

    def forward(self, x):
        return self.b(self.a(self.stem(x)))


def test_conv_registered_under_two_parents_is_kept_and_named():
    model, report = convert_with_report(_TwoParents(), {})
    assert report["stem"].converted
    row = report["a.0"]
    assert not row.converted and "a.0" in row.reason and "b.0" in row.reason
    assert model.a[0] is model.b[0] and type(model.a[0]) is nn.Conv2d

