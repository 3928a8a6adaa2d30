"""A small end-to-end LR-net run on the offline digits: the README's first command.

pretrain an FP MLP -> build LR layers from its weights (`from_float`) -> fine-tune the
weight distributions -> freeze to the discrete network -> export QONNX -> verify the
file with qonnx against PyTorch. Everything runs on a CPU in well under a minute.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from .data import digits_split
from .export import export_qonnx, verify_qonnx
from .freeze import freeze
from .nn import LRQuantLinear, lr_regularization
from .quant import lr_weight_quant

__all__ = ["DemoConfig", "mlp", "to_lr", "fit", "accuracy", "run_demo"]


@dataclass
class DemoConfig:
    distribution: str = "binary"
    hidden: int = 256
    fp_epochs: int = 20
    lr_epochs: int = 30
    batch_size: int = 64
    fp_lr: float = 1e-2
    lr_lr: float = 1e-2
    regularizer: float = 1e-6
    per_channel_scale: bool = False
    seed: int = 0
    output_dir: Optional[str] = "lr_quant_demo"
    extra: Dict[str, float] = field(default_factory=dict)


def mlp(hidden: int = 256) -> nn.Sequential:
    """64 -> hidden -> BN -> ReLU -> hidden -> BN -> ReLU -> 10."""
    return nn.Sequential(
        nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, 10))


def to_lr(model: nn.Sequential, distribution: str = "binary", per_channel_scale: bool = False):
    """Replace every nn.Linear of a Sequential by an LR layer initialized from it."""
    quant = lr_weight_quant(distribution, per_channel_scale)
    return nn.Sequential(*[
        LRQuantLinear.from_float(m, weight_quant=quant) if isinstance(m, nn.Linear) else m
        for m in model])


def fit(model, x, y, epochs, lr, batch_size, regularizer=0.0, seed=0):
    """Adam on cross-entropy (+ regularizer * LR regularization), seeded minibatches."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:
                continue
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            if regularizer:
                loss = loss + regularizer * lr_regularization(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    return model


@torch.no_grad()
def accuracy(model, x, y) -> float:
    was_training = model.training
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return acc


def run_demo(config: DemoConfig = DemoConfig(), log=print) -> Dict[str, float]:
    torch.manual_seed(config.seed)
    x_train, y_train, x_test, y_test = digits_split(seed=config.seed)
    fp = fit(mlp(config.hidden), x_train, y_train, config.fp_epochs, config.fp_lr,
             config.batch_size, seed=config.seed)
    results = {"fp_accuracy": accuracy(fp, x_test, y_test)}
    log(f"full precision MLP          test accuracy {results['fp_accuracy']:.3f}")
    lr_model = to_lr(fp, config.distribution, config.per_channel_scale)
    results["converted_mode_accuracy"] = accuracy(lr_model, x_test, y_test)
    log(f"LR {config.distribution:8s} at conversion  test accuracy "
        f"{results['converted_mode_accuracy']:.3f}")
    fit(lr_model, x_train, y_train, config.lr_epochs, config.lr_lr, config.batch_size,
        config.regularizer, seed=config.seed + 1)
    freeze(lr_model)
    results["frozen_accuracy"] = accuracy(lr_model, x_test, y_test)
    log(f"LR {config.distribution:8s} frozen (mode)   test accuracy {results['frozen_accuracy']:.3f}")
    if config.output_dir:
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        batch = 64
        path = export_qonnx(lr_model, x_test[:batch], out / f"mlp_{config.distribution}.onnx",
                            require_frozen=True)
        results["qonnx_max_abs_error"] = verify_qonnx(
            path, lr_model, [x_test[i:i + batch] for i in range(0, len(x_test) - batch + 1, batch)])
        log(f"QONNX export {path} verified by qonnx: max abs error "
            f"{results['qonnx_max_abs_error']:.2e}")
        (out / "results.json").write_text(json.dumps({"config": asdict(config), **results}, indent=2))
    return results
