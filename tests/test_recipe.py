"""Recipe: versioned dataclass, YAML/dict round trip, strict validation naming the key path."""

from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Tuple, Union

import pytest

from lr_quant import registry
from lr_quant.recipe import (RECIPE_VERSION, ActQuantSpec, Recipe, RecipeError, WeightQuantSpec,
                             available_recipes, from_dict, load_recipe, to_dict)
from lr_quant.train_config import TrainConfig


def test_defaults_round_trip_dict_and_yaml(tmp_path):
    recipe = Recipe()
    assert recipe.version == RECIPE_VERSION == 2
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    path = tmp_path / "r.yaml"
    recipe.to_yaml(path)
    assert Recipe.from_yaml(path) == recipe


def test_full_recipe_round_trip(tmp_path):
    data = {
        "version": 2,
        "name": "custom",
        "model": {"name": "resnet10t", "num_classes": 10, "kwargs": {"drop_rate": 0.1}},
        "weights": {"conv": "lr_ternary_per_channel", "depthwise": None,
                    "linear": {"name": "lr_categorical", "values": [-2, -1, 0, 1, 2],
                               "per_channel_scale": True}},
        "activations": {"quantizer": {"name": "stochastic_sign", "noise_std": 0.5},
                        "input_quantizer": "int8", "drop_relu": False},
        "keep_fp": {"first_conv": False, "names": ["fc", r"re:layer4\..*"]},
        "overrides": {r"re:.*downsample.*": {"weights": "lr_ternary"},
                      "layer1.0.conv1": {"float_input": True}},
        "init": {"from_pretrained": False, "p_min": 0.1, "p_max": 0.9, "seed": 3},
        "train": {"epochs": 2, "beta_regularizer": 1e-4,
                  "sign_temperature": {"start": 1.0, "end": 0.5, "kind": "cosine"}},
        "data": {"dataset": "digits", "image_size": 16},
    }
    recipe = Recipe.from_dict(data)
    assert recipe.weights.depthwise is None
    assert recipe.weights.linear.resolve().precision == 3
    assert recipe.activations.quantizer.resolve().name == "stochastic_sign"
    assert recipe.train.sign_temperature.kind == "cosine"
    assert recipe.overrides["layer1.0.conv1"].float_input
    assert recipe.init.p_min == 0.1 and isinstance(recipe.init.p_min, float)
    again = Recipe.from_dict(recipe.to_dict())
    assert again == recipe
    assert again.to_dict()["weights"]["linear"] == data["weights"]["linear"]
    recipe.to_yaml(tmp_path / "c.yaml")
    assert Recipe.from_yaml(tmp_path / "c.yaml") == recipe


@pytest.mark.parametrize("data,path,words", [
    ({"weights": {"distribution": "binary"}}, "weights.distribution",
     ["unknown key 'distribution'", "conv", "depthwise", "linear"]),
    ({"wieghts": {}}, "wieghts", ["unknown key", "did you mean 'weights'"]),
    ({"weights": {"conv": "lr_binery"}}, "weights.conv",
     ["unknown weight quantizer 'lr_binery'", "lr_binary_per_channel", "did you mean 'lr_binary'"]),
    ({"weights": {"conv": 3}}, "weights.conv", ["expected a weight quantizer name", "int 3"]),
    ({"activations": {"quantizer": "sign"}}, "activations.quantizer",
     ["unknown activation quantizer 'sign'", "stochastic_sign", "ste_sign", "int8"]),
    ({"activations": {"quantizer": {"name": "stochastic_sign", "sigma": 1}}},
     "activations.quantizer", ["no option(s) ['sigma']", "noise_std"]),
    ({"activations": {"threshold_init": "max"}}, "activations.threshold_init",
     ["'max'", "median"]),
    ({"weights": {"linear": {"name": "lr_categorical"}}}, "weights.linear", ["values"]),
    ({"weights": {"linear": {"name": "lr_categorical", "values": [-1, 1000]}}},
     "weights.linear", ["at most 8 bits"]),
    ({"train": {"epochs": "10"}}, "train.epochs", ["expected an integer", "str '10'"]),
    ({"train": {"epochs": 2.5}}, "train.epochs", ["expected an integer"]),
    ({"train": {"amp": 1}}, "train.amp", ["expected true/false"]),
    ({"train": {"optimizer": "lamm"}}, "train.optimizer",
     ["'lamm'", "not a timm optimizer", "did you mean 'lamb'", "list_optimizers()"]),
    ({"train": {"schedule": "cosin"}}, "train.schedule", ["'cosin'", "did you mean 'cosine'"]),
    ({"train": {"schedule_kwargs": {"nois": 1}}}, "train.schedule_kwargs",
     ["unknown key 'nois'", "did you mean 'noise'"]),
    ({"train": {"decay_milestones": "30"}}, "train.decay_milestones", ["expected a list"]),
    ({"train": {"sign_temperature": {"kind": "step"}}}, "train.sign_temperature.kind",
     ["'step'", "cosine"]),
    ({"data": {"dataset": "mnist"}}, "data.dataset", ["'mnist'", "digits"]),
    ({"data": {"image_size": 4}}, "data.image_size", [">= 8"]),
    ({"keep_fp": {"names": "fc"}}, "keep_fp.names", ["expected a list"]),
    ({"keep_fp": {"names": ["re:layer[1"]}}, "keep_fp.names[0]", ["bad regular expression"]),
    ({"overrides": {"re:(conv": {"keep_fp": True}}}, "overrides.re:(conv",
     ["bad regular expression"]),
    ({"overrides": {"fc": {"keep": True}}}, "overrides.fc.keep", ["unknown key 'keep'"]),
    ({"overrides": {"fc": "lr_binary"}}, "overrides.fc", ["expected a mapping"]),
    ({"model": {"kwargs": []}}, "model.kwargs", ["expected a mapping"]),
    ({"init": {"p_min": "low"}}, "init.p_min", ["expected a number"]),
    ({"version": 3}, "version", ["not supported"]),
    ({"version": "1"}, "version", ["expected an integer"]),
])
def test_bad_recipes_name_the_key_path_value_and_choices(data, path, words):
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(data)
    assert info.value.path == path
    message = str(info.value)
    assert message.startswith(path + ":")
    for word in words:
        assert word in message, (word, message)


def test_post_init_errors_of_nested_sections_keep_the_path():
    with pytest.raises(RecipeError, match=r"^init: probability bounds"):
        Recipe.from_dict({"init": {"p_min": 0.9, "p_max": 0.5}})
    with pytest.raises(RecipeError, match=r"^train\.batch_size: batch_size must be >= 1"):
        Recipe.from_dict({"train": {"batch_size": 0}})


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("weights:\n  conv: lr_binery\n")
    with pytest.raises(RecipeError, match=r"weights\.conv: .*bad\.yaml"):
        Recipe.from_yaml(path)
    path.write_text("weights: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.from_yaml(path)


def test_generic_validator_on_any_dataclass():
    @dataclass
    class Inner:
        k: Literal["a", "b"] = "a"

    @dataclass
    class Outer:
        n: int
        x: Optional[float] = None
        u: Union[int, str] = 0
        items: List[Inner] = field(default_factory=list)
        table: Dict[str, Tuple[int, int]] = field(default_factory=dict)

    out = from_dict(Outer, {"n": 1, "x": 2, "u": "s", "items": [{"k": "b"}],
                            "table": {"a": [1, 2]}})
    assert out == Outer(1, 2.0, "s", [Inner("b")], {"a": (1, 2)})
    assert from_dict(Outer, to_dict(out)) == out
    with pytest.raises(RecipeError, match=r"^n: required key is missing"):
        from_dict(Outer, {})
    with pytest.raises(RecipeError, match=r"^items\[0\]\.k: 'c' is not one of \['a', 'b'\]"):
        from_dict(Outer, {"n": 1, "items": [{"k": "c"}]})
    with pytest.raises(RecipeError, match=r"^table\.a: expected 2 items"):
        from_dict(Outer, {"n": 1, "table": {"a": [1]}})
    with pytest.raises(RecipeError, match=r"^u: .*matches none of"):
        from_dict(Outer, {"n": 1, "u": 1.5})
    with pytest.raises(RecipeError, match=r"^x: null|^n: expected an integer"):
        from_dict(Outer, {"n": None})
    # TrainConfig is validated by the same function
    assert from_dict(TrainConfig, {"epochs": 3}).epochs == 3


def test_registry_names_and_precision():
    weights = registry.available_weight_quantizers()
    for name in ("lr_binary", "lr_binary_per_channel", "lr_ternary", "lr_ternary_per_channel",
                 "lr_categorical", "brevitas_binary", "brevitas_ternary"):
        assert name in weights
    assert registry.get_weight_quantizer("lr_binary").precision == 1
    assert registry.get_weight_quantizer("lr_ternary_per_channel").precision == 2
    assert registry.get_weight_quantizer("brevitas_ternary").family == "brevitas"
    quinary = registry.get_weight_quantizer({"name": "lr_categorical",
                                             "values": [-2, -1, 0, 1, 2]})
    assert quinary.precision == 3 and quinary.is_lr
    acts = registry.available_act_quantizers()
    assert {"stochastic_sign", "ste_sign", "int8"} <= set(acts)
    assert registry.get_act_quantizer("int8").precision == 8
    assert registry.get_act_quantizer("stochastic_sign").is_sign
    assert registry.get_weight_quantizer(None) is None
    with pytest.raises(ValueError, match="unknown weight quantizer 'nope'"):
        registry.get_weight_quantizer("nope")


def test_register_a_new_quantizer_name():
    from lr_quant.quant import lr_weight_quant

    @registry.register_weight_quantizer("test_quinary")
    def _quinary():
        return registry.WeightQuantizer(
            "test_quinary", lr_weight_quant({"name": "categorical", "values": (-2, -1, 0, 1, 2)}),
            3, registry.LR)
    try:
        recipe = Recipe.from_dict({"weights": {"conv": "test_quinary"}})
        assert recipe.weights.conv == WeightQuantSpec("test_quinary")
        with pytest.raises(ValueError, match="already registered"):
            registry.register_weight_quantizer("test_quinary")(_quinary)
    finally:
        registry._WEIGHT.pop("test_quinary")


def test_load_recipe_by_name_path_and_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)       # packaged recipes are found from any directory
    assert "quickstart" in available_recipes()
    quick = load_recipe("quickstart")
    assert quick.name == "quickstart"
    path = tmp_path / "mine.yaml"
    quick.to_yaml(path)
    assert load_recipe(str(path)) == quick
    assert load_recipe(path) == quick
    assert load_recipe(quick) is quick
    assert load_recipe({"name": "x"}).name == "x"
    with pytest.raises(FileNotFoundError, match=r"no recipe named 'quickstrat'.*did you mean "
                                                r"'quickstart'"):
        load_recipe("quickstrat")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_recipe("nothere.yaml")


def test_act_spec_str_and_options():
    spec = Recipe.from_dict({"activations": {"quantizer": {
        "name": "stochastic_sign", "noise_std": 0.5, "mode": "noise"}}}).activations.quantizer
    assert isinstance(spec, ActQuantSpec)
    assert str(spec) == "stochastic_sign(mode=noise, noise_std=0.5)"
    assert spec.resolve().injector.sign_mode == "noise"


def test_version_1_names_load_with_a_deprecation_warning():
    """Recipe version 2 renamed train.lr_logits / lr_params (learning rates) to logits_lr /
    params_lr; version-1 files and checkpoints still load, version-2 ones must use the
    new names."""
    old = {"version": 1, "train": {"lr_logits": 0.1, "lr_params": 0.002, "epochs": 3}}
    with pytest.warns(DeprecationWarning, match="train.lr_logits is now train.logits_lr"):
        recipe = Recipe.from_dict(old)
    assert (recipe.train.logits_lr, recipe.train.params_lr, recipe.train.epochs) == (0.1, 0.002, 3)
    assert recipe.version == 2 and "lr_logits" not in recipe.to_dict()["train"]
    assert old["train"]["lr_logits"] == 0.1          # the caller's mapping is not modified
    with pytest.raises(RecipeError, match="train.lr_logits: renamed to train.logits_lr"):
        Recipe.from_dict({"version": 2, "train": {"lr_logits": 0.1}})
    with pytest.raises(RecipeError, match="both set"):
        Recipe.from_dict({"version": 1, "train": {"lr_logits": 0.1, "logits_lr": 0.2}})
