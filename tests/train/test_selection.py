"""The deployed network after training (lr_quant.train.selection): the sampled-network
choice on validation, and the path of models without LR layers."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lr_quant.checkpoint import load_checkpoint
from lr_quant.data import Datasets
from lr_quant.nn import LRQuantLinear
from lr_quant.quant import lr_weight_quant
from lr_quant.train import (FINAL_CHECKPOINT, NO_LR_NETWORK, Trainer, choose_sampled_network,
                            deploy, evaluate, reestimate_batchnorm)
from lr_quant.train_config import TrainConfig


def tiny_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:].sum(1) > 0).long()
    split = TensorDataset(x[:32], y[:32])
    train = TensorDataset(x[32:], y[32:])
    return Datasets(train=train, val=split, test=TensorDataset(x[:48], y[:48]), num_classes=4,
                    train_eval=train, example_shape=(8,))


def lr_model():
    torch.manual_seed(0)
    quant = lr_weight_quant("binary", False)
    return nn.Sequential(LRQuantLinear(8, 16, bias=False, weight_quant=quant), nn.BatchNorm1d(16),
                         nn.ReLU(), nn.Linear(16, 4))


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode_val_accuracy", [-1.0, 2.0], ids=["sample-wins", "mode-wins"])
def test_choose_sampled_network_keeps_the_validation_best(mode_val_accuracy):
    data = tiny_data()
    batches = [data.train.tensors[0][:32]]
    model = lr_model()
    # oracle: every sampled network built and scored on its own copy
    vals = [evaluate(deploy(copy.deepcopy(model), batches, "sample", 5 + k), data.val)["accuracy"]
            for k in range(4)]
    metrics, chosen = choose_sampled_network(model, batches, data.val, data.test, 4, 5,
                                             mode_val_accuracy)
    best = 5 + vals.index(max(vals))
    assert metrics["sampled_best_seed"] == best
    assert metrics["sampled_best_val_accuracy"] == max(vals)
    assert metrics["sampled_mean_val_accuracy"] == pytest.approx(sum(vals) / 4)
    expected = deploy(copy.deepcopy(lr_model()), batches, "sample", best)
    assert metrics["sampled_best_test_accuracy"] == evaluate(expected, data.test)["accuracy"]
    if mode_val_accuracy > 1:   # no sample beats the mode: the model is the mode again
        assert chosen is None
        expected = deploy(copy.deepcopy(lr_model()), batches)
    else:
        assert chosen == best
    for k, v in weights(expected).items():
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(ValueError, match="needs num_samples >= 1"):
        choose_sampled_network(model, batches, data.val, data.test, 0, 5, 0.5)


def test_finalize_without_lr_layers_reestimates_batchnorm_and_saves(tmp_path):
    """A model without LR layers: nothing to freeze or sample; the deployed network is the
    trained one with BatchNorm re-estimated, saved as the final checkpoint."""
    data = tiny_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    logs = []
    cfg = TrainConfig(epochs=1, batch_size=16, params_lr=1e-2, sampled_networks=3,
                      bn_reestimate_batches=2)
    trainer = Trainer(model, cfg, data, output_dir=tmp_path, log=logs.append, progress=False)
    trainer.fit()
    trained = copy.deepcopy(model)
    metrics = trainer.finalize()
    assert any("sampled_networks=3 ignored" in line for line in logs)
    assert metrics["selected_network"] == NO_LR_NETWORK
    assert metrics["trained_test_accuracy"] == evaluate(trained, data.test)["accuracy"]
    assert metrics["trained_val_accuracy"] == evaluate(trained, data.val)["accuracy"]
    reestimate_batchnorm(trained, trainer._bn_batches())
    for k, v in weights(trained).items():
        assert torch.equal(model.state_dict()[k], v), k
    assert metrics["frozen_test_accuracy"] == evaluate(trained, data.test)["accuracy"]
    assert metrics["final_test_accuracy"] == metrics["frozen_test_accuracy"]
    assert not [k for k in metrics if k.startswith(("lr_mode", "sampled"))]
    state, meta, _ = load_checkpoint(tmp_path / FINAL_CHECKPOINT)
    assert meta["frozen"] and meta["metrics"] == metrics
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
