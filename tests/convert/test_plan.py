"""The plan: override / keep_fp precedence, rules matching nothing, layers kept with a reason."""

import copy

import pytest
import timm
from torch import nn

from lr_quant.convert import convert, convert_with_report
from lr_quant.recipe import RecipeError


def test_override_precedence_exact_beats_regex_first_regex_wins():
    model = timm.create_model("test_resnet", num_classes=10)
    recipe = {
        "weights": {"conv": "lr_binary"},
        "overrides": {
            r"re:layer1\.0\.conv1": {"weights": "lr_ternary_per_channel"},
            r"re:layer[12]\..*": {"weights": "lr_ternary"},
            "layer1.0.conv2": {"keep_fp": True},                 # exact beats the regex
            "conv1.0": {"weights": "lr_binary_per_channel"},    # beats keep_fp.first_conv
        },
    }
    _, report = convert_with_report(model, recipe)
    assert report["layer1.0.conv1"].weight_quant == "lr_ternary_per_channel"   # first regex
    assert report["layer2.0.conv1"].weight_quant == "lr_ternary"
    assert not report["layer1.0.conv2"].converted
    assert "keep_fp" in report["layer1.0.conv2"].reason
    assert report["conv1.0"].weight_quant == "lr_binary_per_channel"
    assert report["conv1.3"].weight_quant == "lr_binary"
    assert report["layer3.0.conv1"].weight_quant == "lr_binary"
    assert not report["fc"].converted


def test_shadowed_override_is_an_error():
    model = timm.create_model("test_resnet", num_classes=10)
    recipe = {"overrides": {r"re:layer1\..*": {"weights": "lr_ternary"},
                            r"re:layer1\.0\.conv1": {"weights": "lr_binary"}}}
    with pytest.raises(RecipeError, match=r"never applies.*first matching regex wins"):
        convert(model, recipe)


def test_override_or_keep_name_matching_nothing_is_an_error():
    model = timm.create_model("test_resnet", num_classes=10)
    with pytest.raises(RecipeError, match=r"overrides\.layer1\.0\.conv9.*matches no Conv/Linear"
                                          r".*layer1\.0\.conv1"):
        convert(copy.deepcopy(model), {"overrides": {"layer1.0.conv9": {"keep_fp": True}}})
    with pytest.raises(RecipeError, match=r"overrides\.re:blocks.*matches no"):
        convert(copy.deepcopy(model), {"overrides": {r"re:blocks\.\d+": {"keep_fp": True}}})
    with pytest.raises(RecipeError, match=r"keep_fp\.names.*'layer9'"):
        convert(copy.deepcopy(model), {"keep_fp": {"names": ["layer9"]}})
    # a container name is not a layer: the message points at the layers
    with pytest.raises(RecipeError, match="matches no Conv/Linear"):
        convert(copy.deepcopy(model), {"overrides": {"layer1": {"keep_fp": True}}})


def test_shared_module_is_kept():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), conv, nn.ReLU(), conv)
    _, report = convert_with_report(model, {})
    assert not report["1"].converted and "shared" in report["1"].reason
    assert "'1', '3'" in report["1"].reason            # every name it is registered under
    assert model[1] is model[3]


def test_zero_initialized_layer_is_kept_with_reason():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    nn.init.zeros_(model[2].weight)
    _, report = convert_with_report(model, {})
    assert report["0"].converted
    assert not report["2"].converted and "constant float weight" in report["2"].reason
