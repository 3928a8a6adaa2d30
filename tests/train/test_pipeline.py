"""`run_training` returns the trained model (TrainingResult): the deployed network that
final.safetensors holds, with the metrics, recipe and data of the run."""

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
    assert isinstance(result, TrainingResult) and result.recipe is recipe
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
