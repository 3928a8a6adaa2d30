"""Every file in recipes/ loads, validates, round-trips and converts a tiny timm model."""

from pathlib import Path

import pytest
import timm
import torch
import yaml

import lr_quant
from lr_quant.convert import convert_with_report
from lr_quant.quant.threshold import calibrate_thresholds
from lr_quant.recipe import Recipe, load_recipe, recipe_dirs

RECIPES_DIR = Path(lr_quant.__file__).resolve().parent.parent / "recipes"
FILES = sorted(RECIPES_DIR.glob("*.yaml"))
REQUIRED = {"quickstart", "resnet_w1", "resnet_w2", "resnet_w1a1", "resnet_w1a1_stochastic",
            "resnet_w1a2",
            "mobilenet_w1", "finn_cnv_w1a1", "finn_resnet_w1a2"}


def test_recipes_dir_is_found_and_complete():
    assert RECIPES_DIR in recipe_dirs()
    assert REQUIRED <= {p.stem for p in FILES}


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_recipe_file_validates_and_round_trips(path):
    raw = yaml.safe_load(path.read_text())
    recipe = Recipe.from_yaml(path)
    assert recipe.version == 2 and raw["version"] == 2   # packaged recipes: the current version
    assert recipe.name == path.stem
    assert load_recipe(path.stem) == recipe
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    # what the file says is what the recipe holds (no key silently ignored)
    for section, values in raw.items():
        if isinstance(values, dict) and section not in ("overrides",):
            dumped = recipe.to_dict()[section]
            for key, value in values.items():
                assert dumped[key] == value, (section, key)
    if recipe.model.name is not None:
        assert timm.list_models(recipe.model.name), recipe.model.name


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_recipe_file_converts_a_tiny_timm_model(path):
    torch.manual_seed(0)
    recipe = Recipe.from_yaml(path)
    if recipe.model.name == "finn_cnv":  # a recipe for one model (its overrides name layers)
        model = timm.create_model("finn_cnv", num_classes=10, channels=(4, 8, 8), fc_features=8)
    else:
        # a FINN recipe's model kwargs shape the topology it maps (e.g. avg_down: false)
        kwargs = recipe.model.kwargs if recipe.finn else {}
        model = timm.create_model("test_efficientnet" if "mobilenet" in path.stem
                                  else "test_resnet", num_classes=10, **kwargs)
    model, report = convert_with_report(model, recipe)
    assert report.converted
    x = torch.randn(2, 3, 32, 32)
    calibrate_thresholds(model, x)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1]))
    assert torch.isfinite(loss)
    loss.backward()
    if recipe.activations.quantizer is not None:
        bits = recipe.activations.quantizer.resolve().precision
        assert any(r.input_bits == bits for r in report.converted)
    if path.stem == "mobilenet_w1":
        depthwise = [r for r in report.converted if r.kind == "depthwise"]
        assert depthwise and all(r.weight_bits == 2 for r in depthwise)
