"""The deployed network after training, and its accuracies.

`select_network` turns a trained model into the network to deploy, in place, and measures
it (validation split carved from train; test split):

  a model with LR layers:
    lr_mode_*     the trained LR model in eval() before freezing: mode weights with the
                  BatchNorm statistics gathered on stochastic LR training passes
    frozen_*      `deploy`: freeze(model, "mode") + BatchNorm statistics re-estimated on
                  the frozen network from training batches — the deployed network
    sampled_*     with sampled_networks = K > 0 (`choose_sampled_network`): K sampled
                  networks freeze(model, "sample", seed + k), each with re-estimated
                  BatchNorm, compared on the validation split; the best is kept only if it
                  beats the mode on validation
  a model without LR layers (STE / Brevitas quantizers, float): its training forward is
  already the deployed network, so nothing is frozen or sampled:
    trained_*     the trained model in eval(), BatchNorm statistics of training
    frozen_*      the same weights with BatchNorm re-estimated — the deployed network
  selected_network, final_test_accuracy: the kept network and its test accuracy.

The test split is measured but never takes part in a choice.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..data import Datasets
from ..distributed import DistInfo
from ..freeze import freeze
from ..nn.lr_layers import lr_layers
from ..train_config import TrainConfig
from .evaluation import evaluate, reestimate_batchnorm

__all__ = ["select_network", "deploy", "choose_sampled_network", "NO_LR_NETWORK"]

# `selected_network` of a model without LR layers
NO_LR_NETWORK = "trained (no LR layers), BN re-estimated"


def deploy(model: nn.Module, bn_batches: Sequence[Tensor], how: str = "mode",
           seed: Optional[int] = None) -> nn.Module:
    """freeze(model, how, seed) + BatchNorm re-estimated on `bn_batches`; model in eval()."""
    freeze(model, how, seed=seed)
    reestimate_batchnorm(model, bn_batches)
    return model


def choose_sampled_network(model: nn.Module, bn_batches: Sequence[Tensor], val: Dataset,
                           test: Dataset, num_samples: int, seed: int, mode_val_accuracy: float,
                           batch_size: int = 256, info: DistInfo = DistInfo()
                           ) -> Tuple[Dict[str, Any], Optional[int]]:
    """Compare `num_samples` sampled networks (seeds seed, seed + 1, ...) with the mode.

    Returns (metrics, chosen seed): metrics sampled_mean_val_accuracy,
    sampled_best_val_accuracy, sampled_best_seed and sampled_best_test_accuracy; the chosen
    seed is None when no sample beats `mode_val_accuracy` on validation. `model` is left
    deployed as the chosen network (the mode when the seed is None).
    """
    if num_samples < 1 or not len(val):
        raise ValueError(f"choosing among sampled networks needs num_samples >= 1 "
                         f"(got {num_samples}) and a validation split (got {len(val)} samples)")
    vals = []
    for k in range(num_samples):
        deploy(model, bn_batches, "sample", seed + k)
        vals.append(evaluate(model, val, batch_size, info)["accuracy"])
    best = seed + int(np.argmax(vals))   # the first of equal bests
    deploy(model, bn_batches, "sample", best)
    metrics = {"sampled_mean_val_accuracy": float(np.mean(vals)),
               "sampled_best_val_accuracy": max(vals),
               "sampled_best_seed": best,
               "sampled_best_test_accuracy": evaluate(model, test, batch_size, info)["accuracy"]}
    if max(vals) > mode_val_accuracy:
        return metrics, best
    deploy(model, bn_batches, "mode")
    return metrics, None


def select_network(model: nn.Module, data: Datasets, config: TrainConfig,
                   bn_batches: Sequence[Tensor], info: DistInfo = DistInfo(),
                   baseline: Optional[Dict[str, Any]] = None,
                   log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Leave `model` as the deployed network (in eval()); returns `baseline` plus the
    accuracies of the module doc."""
    metrics: Dict[str, Any] = dict(baseline or {})

    def accuracies(prefix: str) -> None:
        for split in ("val", "test"):
            dataset = getattr(data, split)
            if split == "test" or len(dataset):
                metrics[f"{prefix}_{split}_accuracy"] = evaluate(
                    model, dataset, config.eval_batch_size, info)["accuracy"]

    if lr_layers(model):
        accuracies("lr_mode")
        deploy(model, bn_batches)
        accuracies("frozen")
        selected = "mode"
        if config.sampled_networks > 0 and len(data.val):
            sampled, seed = choose_sampled_network(
                model, bn_batches, data.val, data.test, config.sampled_networks, config.seed,
                metrics["frozen_val_accuracy"], config.eval_batch_size, info)
            metrics.update(sampled)
            if seed is not None:
                selected = f"sample seed {seed}"
    else:
        if config.sampled_networks > 0:
            log(f"train.sampled_networks={config.sampled_networks} ignored: the model has no "
                f"LR layers (its trained weights are the deployed network)")
        accuracies("trained")
        reestimate_batchnorm(model, bn_batches)
        accuracies("frozen")
        selected = NO_LR_NETWORK
    metrics["selected_network"] = selected
    metrics["final_test_accuracy"] = (metrics["sampled_best_test_accuracy"]
                                      if selected.startswith("sample")
                                      else metrics["frozen_test_accuracy"])
    model.eval()
    return metrics
