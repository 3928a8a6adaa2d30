"""`run_training` returns the trained model (TrainingResult): the deployed network that
final.safetensors holds, with the metrics, recipe and data of the run."""

import dataclasses

import timm
import torch

from lr_quant import is_frozen
from lr_quant.recipe import Recipe, load_recipe
from lr_quant.train import (FINAL_CHECKPOINT, TrainingResult, evaluate, load_trained_model,
                            run_training)


def tiny_recipe(checkpoint) -> Recipe:
    recipe = load_recipe("quickstart").to_dict()
    recipe["model"]["checkpoint"] = str(checkpoint)
    recipe["data"]["train_fraction"] = 0.15
    recipe["train"].update(epochs=1, batch_size=32, sampled_networks=1, bn_reestimate_batches=2,
                           val_fraction=0.05)
    return Recipe.from_dict(recipe)


def quiet(*_):
    pass


def test_run_training_returns_the_deployed_model(tmp_path, fp_weights):
    recipe = tiny_recipe(fp_weights)
    result = run_training(recipe, tmp_path / "run", log=quiet, progress=False)
    assert isinstance(result, TrainingResult)
    # the recipe that ran: its data: section resolved against the model's pretrained_cfg
    assert dataclasses.replace(result.recipe, data=recipe.data) == recipe
    cfg = timm.create_model("resnet10t").pretrained_cfg
    assert result.recipe.data.mean == list(cfg["mean"]) and result.recipe.data.image_size == 16
    assert result.recipe.data.crop_pct == cfg["crop_pct"]
    assert is_frozen(result.model) and not result.model.training
    accuracy = evaluate(result.model, result.data.test)["accuracy"]
    assert accuracy == result.metrics["final_test_accuracy"]
    # the same network as the checkpoint written to disk (reloaded from its recipe)
    reloaded, _, _ = load_trained_model(tmp_path / "run" / FINAL_CHECKPOINT)
    x = torch.stack([result.data.test[i][0] for i in range(8)])
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), reloaded(x), rtol=0, atol=0)


def test_run_training_stopped_early_returns_the_unfinished_model(tmp_path, fp_weights):
    result = run_training(tiny_recipe(fp_weights), tmp_path / "run", log=quiet, progress=False,
                          stop_after_steps=2)
    assert result.metrics == {}
    assert not is_frozen(result.model)
    assert not (tmp_path / "run" / FINAL_CHECKPOINT).exists()
    assert (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_run_training_sharpens_to_the_recipe_target_snr(tmp_path, fp_weights):
    """init.target_snr: the logits training starts from are Shayer's conversion tempered per
    layer by a gain of the grid (oracle: an independent conversion, sharpened by that gain;
    logits_lr ~ 0 keeps one optimizer step from moving them)."""
    from lr_quant.convert import convert
    from lr_quant.nn import lr_layers
    from lr_quant.sharpness import SHARPNESS_GAINS
    from lr_quant.train import build_float_model

    recipe = tiny_recipe(fp_weights).to_dict()
    recipe["init"]["target_snr"] = 50.0
    recipe["train"]["logits_lr"] = 1e-30
    recipe = Recipe.from_dict(recipe)
    lines = []
    result = run_training(recipe, tmp_path / "run", log=lines.append, progress=False,
                          stop_after_steps=1)
    assert any(line.startswith("sharpened the weight distributions") for line in lines)
    reference = convert(build_float_model(recipe, 10), recipe)
    sharpened = 0
    for (name, trained), (_, ref) in zip(lr_layers(result.model), lr_layers(reference)):
        dist = ref.lr_distribution
        base = ref.weight_logits.detach()
        matches = [g for g in SHARPNESS_GAINS
                   if torch.allclose(trained.weight_logits.detach(), dist.sharpen(base, g),
                                     rtol=1e-5, atol=1e-5)]
        assert matches, name
        sharpened += matches[0] > 1
        assert torch.equal(dist.mode(trained.weight_logits.detach()), dist.mode(base))
    assert sharpened >= 1
