"""Recipe overrides by key path (what `lr-quant --section.key` / `--set` do)."""

import pytest

from lr_quant.recipe import load_recipe
from lr_quant.recipe_overrides import FIELD_HELP, apply_overrides, scalar_fields
from lr_quant.schema import RecipeError
from lr_quant.train_config import TrainConfig


def test_values_and_sets_apply_over_the_recipe_in_order():
    base = load_recipe("quickstart")
    recipe = apply_overrides("quickstart", {"train.epochs": "3", "train.params_lr": 2e-3},
                             ["weights.conv=lr_ternary_per_channel", "train.epochs=5"])
    assert recipe.train.epochs == 5 and recipe.train.params_lr == 2e-3
    assert str(recipe.weights.conv) == "lr_ternary_per_channel"
    assert recipe.model == base.model and recipe.train.logits_lr == base.train.logits_lr
    assert apply_overrides(None, {}).train == TrainConfig()


@pytest.mark.parametrize("values, sets, message", [
    ({"train.epochs": "three"}, [], "train.epochs"),
    ({}, ["train.epochs"], "expects KEY=VALUE"),
    ({}, ["name.x=1"], "name is not a section"),
    ({}, ["weights.conv=no_such_quantizer"], "weights.conv"),
])
def test_bad_overrides_name_the_key(values, sets, message):
    with pytest.raises(RecipeError, match=message):
        apply_overrides("quickstart", values, sets)


def test_every_documented_flag_is_a_scalar_field():
    from typing import get_type_hints

    from lr_quant.recipe import Recipe

    hints = get_type_hints(Recipe)
    paths = {p for section in ("model", "train", "data", "init")
             for p, _, _ in scalar_fields(hints[section], section)}
    assert set(FIELD_HELP) <= paths


def test_renamed_flags_still_work_with_a_deprecation_note(capsys):
    from lr_quant.cli import build_parser, resolve_recipe

    args = build_parser().parse_args(["train", "-c", "quickstart", "--output", "x",
                                      "--train.lr_logits", "0.3", "--train.params_lr", "0.004"])
    recipe = resolve_recipe(args)
    assert (recipe.train.logits_lr, recipe.train.params_lr) == (0.3, 0.004)
    assert "--train.lr_logits is deprecated, use --train.logits_lr" in capsys.readouterr().err
