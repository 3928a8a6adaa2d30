"""timm's "finn_cnv" (lr_quant.cnv): FINN's CNV topology, built and loaded by name."""

import pytest
import timm
import torch
import torch.nn.functional as F

import lr_quant  # noqa: F401  (registers finn_cnv)
from lr_quant.models import create_model, save_weights

SMALL = dict(channels=(4, 8, 16), fc_features=12)


def reference_forward(model, x):
    """CNV by hand: six unpadded 3x3 conv-BN-ReLU (max-pool after the 2nd and 4th), then
    the 1x1 convs as Linear layers on the flattened 1x1 map."""
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in model.features if isinstance(m, torch.nn.BatchNorm2d)]
    for i, (conv, bn) in enumerate(zip(convs, bns)):
        x = F.relu(F.batch_norm(F.conv2d(x, conv.weight), bn.running_mean, bn.running_var,
                                bn.weight, bn.bias, eps=bn.eps))
        if i in (1, 3):
            x = F.max_pool2d(x, 2)
    assert x.shape[-2:] == (1, 1)
    x = x.flatten(1)
    fcs = [m for m in model.fc if isinstance(m, torch.nn.Conv2d)]
    fc_bns = [m for m in model.fc if isinstance(m, torch.nn.BatchNorm2d)]
    for fc, bn in zip(fcs, fc_bns):
        x = F.relu(F.batch_norm(F.linear(x, fc.weight.flatten(1)), bn.running_mean,
                                bn.running_var, bn.weight, bn.bias, eps=bn.eps))
    return F.linear(x, model.head.weight.flatten(1), model.head.bias)


def test_finn_cnv_is_a_timm_model_with_the_cnv_function():
    assert timm.is_model("finn_cnv")
    torch.manual_seed(0)
    model = timm.create_model("finn_cnv", num_classes=7, **SMALL).eval()
    assert model.pretrained_cfg["first_conv"] == "features.0"
    assert model.pretrained_cfg["classifier"] == "head"
    assert model.get_classifier() is model.head
    for bn in model.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(model, x))
    assert model(x).shape == (3, 7)
    model.reset_classifier(5)
    assert model(x).shape == (3, 5)


def test_finn_cnv_loads_local_pretrained_weights_and_resets_the_head(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("finn_cnv", num_classes=10, **SMALL)
    path = save_weights(source, tmp_path / "cnv.safetensors")
    same = create_model("finn_cnv", 10, pretrained=path, **SMALL)
    other = create_model("finn_cnv", 4, pretrained=path, **SMALL)
    for name, value in source.state_dict().items():
        torch.testing.assert_close(same.state_dict()[name], value)
        if not name.startswith("head."):
            torch.testing.assert_close(other.state_dict()[name], value)
    assert other.head.out_channels == 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(img_size=24), "CNV needs 1x1"),
    (dict(channels=(8, 8)), "3 widths"),
    (dict(depth=3), "unexpected arguments"),
])
def test_finn_cnv_rejects_what_it_cannot_build(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        timm.create_model("finn_cnv", **kwargs)
