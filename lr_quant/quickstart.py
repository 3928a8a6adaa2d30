"""`lr-quant quickstart`: the whole product on one small, offline example.

    pretrain (or load) a small FP timm ResNet on the bundled digits
    -> convert it with recipes/quickstart.yaml (LR binary weights)
    -> fine-tune the weight distributions from the FP weights (KD from the FP model)
    -> freeze + re-estimate BatchNorm -> export QONNX -> verify with qonnx
    -> print the per-layer summary and the accuracies

Everything runs on a CPU without a network in a minute or two. The pretrained FP weights
are saved as ``<output>/fp_<model>_digits.safetensors`` and reused on the next run (through
timm's ``pretrained_cfg_overlay=dict(file=...)``, as any local weight file would be). A
previous quick start in the output folder is replaced; a folder holding another run is refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from .models import create_model, save_weights
from .train import Trainer
from .train_config import TrainConfig

__all__ = ["QuickstartConfig", "run_quickstart", "pretrain_fp", "load_run_recipe"]


@dataclass
class QuickstartConfig:
    output_dir: str = "lr_quant_quickstart"
    recipe: str = "quickstart"      # a recipe name (recipes/<name>.yaml) or a path
    fp_epochs: int = 3
    epochs: Optional[int] = None    # overrides the recipe's train.epochs
    seed: int = 0
    retrain_fp: bool = False        # pretrain again even if the FP weights file exists
    progress: bool = True


def load_run_recipe(name_or_path: str):
    from .recipe import load_recipe
    return load_recipe(name_or_path)


def pretrain_fp(model_name: str, data, epochs: int, path: Path, seed: int = 0,
                log=print, progress: bool = True):
    """Train a float timm model on `data` and save its weights to `path` (safetensors)."""
    torch.manual_seed(seed)
    model = create_model(model_name, data.num_classes, pretrained=False)
    config = TrainConfig(epochs=epochs, batch_size=64, optimizer="adam", params_lr=3e-3,
                         logits_lr=1e-2, schedule="cosine", seed=seed, val_fraction=0.1)
    trainer = Trainer(model, config, data, output_dir=None, log=log, progress=progress)
    trainer.fit()
    save_weights(model, path)
    return path


def run_quickstart(config: QuickstartConfig = QuickstartConfig(),
                   log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the quick start; returns the metrics (also written to <output>/metrics.json)."""
    from .export import export_qonnx
    from .run_folder import (RUN_FILES, RunFolderError, check_not_input, check_output_folder,
                             run_files)
    from .summary import model_summary
    from .train import build_datasets_for, format_metrics, run_training

    t0 = time.time()
    out = Path(config.output_dir)
    check_not_input([out / n for n in RUN_FILES], {"--recipe": config.recipe})
    check_output_folder(out)
    # a previous quick start (its FP weights are there) is replaced; any other run is kept
    if run_files(out) and not any(out.glob("fp_*_digits*.safetensors")):
        raise RunFolderError(f"{out} holds a run that is not a quick start "
                             f"({', '.join(run_files(out))}); choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    recipe = load_run_recipe(config.recipe)
    model_name = recipe.model.name or "resnet10t"
    if recipe.data.dataset != "digits":
        raise ValueError(f"the quick start runs on the bundled digits; recipe "
                         f"{config.recipe!r} uses data.dataset={recipe.data.dataset!r} "
                         f"(use `lr-quant train` for other data)")
    train_cfg = replace(recipe.train, seed=config.seed,
                        epochs=recipe.train.epochs if config.epochs is None else config.epochs)
    recipe = replace(recipe, train=train_cfg)
    data = build_datasets_for(recipe)

    fp_path = out / f"fp_{model_name}_digits{recipe.data.image_size}.safetensors"
    if config.retrain_fp or not fp_path.exists():
        log(f"[1/4] pretraining a full-precision {model_name} on the digits "
            f"({config.fp_epochs} epochs) -> {fp_path}")
        pretrain_fp(model_name, data, config.fp_epochs, fp_path, config.seed,
                    lambda m: log("      " + m), config.progress)
    else:
        log(f"[1/4] reusing the full-precision {model_name} weights in {fp_path}")
    recipe = replace(recipe, model=replace(recipe.model, name=model_name, pretrained=False,
                                           checkpoint=str(fp_path)))

    log(f"[2/4] converting with recipe {config.recipe!r} and fine-tuning the LR weight "
        f"distributions ({train_cfg.epochs} epochs)")
    result = run_training(recipe, out, log=lambda m: log("      " + m.replace("\n", "\n      ")),
                          progress=config.progress, force=True)
    metrics = result.metrics

    log(f"[3/4] freezing done (kept: {metrics['selected_network']}); exporting QONNX")
    model = result.model.cpu()   # the deployed network (final.safetensors)
    batch = 16
    example = torch.stack([data.test[i][0] for i in range(batch)])
    onnx_path = out / f"{model_name}_lr.onnx"
    checks = [torch.stack([data.test[i][0] for i in range(k, k + batch)])
              for k in range(0, 4 * batch, batch)]
    exported = export_qonnx(model, example, onnx_path, require_frozen=True, check_inputs=checks)
    metrics["qonnx_max_abs_error"] = float(exported.max_abs_error)
    metrics["onnx"] = str(onnx_path)
    log(f"[4/4] {onnx_path} verified by qonnx on {len(checks) * batch} test images: max abs "
        f"error {metrics['qonnx_max_abs_error']:.2e}")
    summary = model_summary(model, example[:1])
    metrics["summary"] = summary.totals
    metrics["seconds"] = time.time() - t0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "summary.txt").write_text(summary.table() + "\n")

    log("")
    log(summary.table())
    log("")
    log(format_metrics(metrics))
    log(f"outputs in {out}/: recipe.yaml, checkpoint.safetensors, final.safetensors, "
        f"history.csv, curves.png, metrics.json, {onnx_path.name}  ({metrics['seconds']:.0f} s)")
    return metrics
