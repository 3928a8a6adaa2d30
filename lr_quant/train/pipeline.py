"""Recipe-level entry points (what `lr-quant train / eval / export` and the quick start call).

    result = run_training(recipe, "runs/x")   # data -> FP model -> convert -> fit -> finalize
    result.model, result.metrics              # the deployed network and its accuracies
    model, recipe, meta = load_trained_model("runs/x/final.safetensors")
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..checkpoint import (CheckpointError, atomic_write_text, load_checkpoint,
                          load_checkpoint_meta, load_model_state)
from ..data import Datasets
from ..data.config import RESOLVED_FIELDS
from ..distributed import DistInfo
from ..nn.lr_layers import lr_layers
from ._util import seed_everything
from .evaluation import evaluate
from .trainer import LAST_CHECKPOINT, Trainer

__all__ = ["TrainingResult", "run_training", "build_float_model", "build_datasets_for",
           "format_metrics", "load_trained_model", "resume_changes", "estimate_checkpoint_bytes"]


@dataclass
class TrainingResult:
    """What `run_training` returns.

    model: the trained model on the training device, in eval(): the deployed network
        (the one saved as final.safetensors) once training finished; the model as it
        stands (not frozen) when `stop_after_steps` stopped it early.
    metrics: the accuracies of `Trainer.finalize` (also metrics.json); empty when stopped
        early.
    recipe: the recipe that was run, its data: section resolved against the model
        (lr_quant.data.resolve; what recipe.yaml records). data: its data sets (train / val /
        test).
    """
    model: nn.Module
    metrics: Dict[str, Any]
    recipe: Any
    data: Datasets


def _image_batch(dataset: Dataset, n: int, offset: int = 0) -> Tensor:
    n = min(n, len(dataset) - offset)
    return torch.stack([torch.as_tensor(dataset[offset + i][0]) for i in range(n)])


def build_float_model(recipe, num_classes: int, pretrained=None) -> nn.Module:
    """The recipe's timm model with its pretrained FP weights (model.checkpoint: a local
    file; model.pretrained: the hub). `pretrained=False` forces a random init."""
    from ..models import ModelError, create_model

    m = recipe.model
    if not m.name:
        raise ModelError("the recipe names no model: set model.name (e.g. --model.name resnet10t)")
    if pretrained is None:
        pretrained = m.checkpoint or m.pretrained
    kwargs = dict(m.kwargs)
    if m.in_chans:
        kwargs["in_chans"] = m.in_chans
    return create_model(m.name, num_classes, pretrained=pretrained, **kwargs)


def _num_classes(recipe, found: int) -> int:
    n = recipe.model.num_classes
    if n is not None and n != found:
        raise ValueError(f"model.num_classes={n} but the data set {recipe.data.dataset!r} has "
                         f"{found} classes")
    return found


# Resume: settings it applies (and records); every other recipe change is refused.
# Fixed on resume: the model, quantizers, init and data content, and in train: the ones the
# saved optimizer state, data order or split depend on.
RESUME_FIXED_TRAIN = ("optimizer", "layer_decay", "batch_size", "seed", "val_fraction",
                      "extra")
RESUME_APPLIED = ("name", "description", "data.root", "data.num_workers", "data.download")
BYTES_PER_PARAMETER = 32   # a checkpoint: weights, LR logits, optimizer moments (<= 8 floats)


def _resume_applies(key: str) -> bool:
    section, _, rest = key.partition(".")
    if section == "train":
        return rest.split(".")[0] not in RESUME_FIXED_TRAIN
    return key in RESUME_APPLIED


def _flat(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out: Dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def resume_changes(recipe, path) -> Dict[str, Tuple[Any, Any]]:
    """{key: (recorded, requested)} of the recipe fields that differ from the recipe recorded
    in checkpoint `path`; RunFolderError (writing nothing) when the checkpoint cannot be
    resumed or a change is one resume does not apply (see RESUME_FIXED_TRAIN)."""
    from ..run_folder import RunFolderError

    meta = load_checkpoint_meta(path)
    if meta.get("frozen"):
        raise CheckpointError(f"{path} holds a frozen (final) network; resume from "
                              f"{LAST_CHECKPOINT}, or evaluate / export it instead")
    recorded = _recorded_recipe(meta, path)
    # null preparation fields mean "the model's": the recorded run resolved them
    unresolved = {k: getattr(recorded.data, k) for k in RESOLVED_FIELDS
                  if getattr(recipe.data, k) is None}
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, **unresolved))
    old, new = _flat(recorded.to_dict()), _flat(recipe.to_dict())
    changes = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k)}
    fixed = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items() if not _resume_applies(k)]
    if fixed:
        raise RunFolderError(
            f"--resume {path}: the recipe changes settings a resumed run cannot change "
            f"(model, quantizers, init, data content, train.{', train.'.join(RESUME_FIXED_TRAIN)}):"
            f" {'; '.join(fixed)}. Resume with the recorded values, or start a new run "
            f"(--force, or another --output)")
    return changes


def estimate_checkpoint_bytes(recipe) -> int:
    """Rough size of a training checkpoint of the recipe's model (0 if unknown)."""
    from ..models import parameter_count

    m = recipe.model
    kwargs = dict(m.kwargs, **({"in_chans": m.in_chans} if m.in_chans else {}))
    n = parameter_count(m.name, m.num_classes or 1000, **kwargs) if m.name else None
    return BYTES_PER_PARAMETER * (n or 0)


def run_training(recipe, output_dir, resume=None, log: Callable[[str], None] = print,
                 progress: bool = True, stop_after_steps: Optional[int] = None,
                 info: Optional[DistInfo] = None, force: bool = False) -> TrainingResult:
    """Fine-tune the recipe's model from its pretrained FP weights, end to end.

    data -> FP model (teacher) -> convert -> sharpen the weight distributions
    (init.target_snr) -> calibrate sign thresholds -> Trainer.fit ->
    Trainer.finalize. Writes recipe.yaml, checkpoint.safetensors, final.safetensors,
    history.csv/json, curves.png and metrics.json to `output_dir` (rank 0).
    Before any work, the folder is checked and locked (lr_quant.run_folder): a folder that
    holds a run is refused unless resuming it or `force` (its files are removed when the
    new run starts writing). `resume`: a checkpoint path, or "auto" for
    output_dir/checkpoint.safetensors (which must exist); the recipe may change only what
    `resume_changes` applies. Returns a `TrainingResult` (metrics empty if stopped early
    by `stop_after_steps`).
    """
    from ..distributed import init_distributed
    from ..run_folder import open_run_folder

    info = info or init_distributed()
    need = estimate_checkpoint_bytes(recipe) if info.is_main else 0
    with open_run_folder(output_dir, resume, force, need, lock=info.is_main) as folder:
        changes = resume_changes(recipe, folder.resume) if folder.resume is not None else {}
        return _run_training(recipe, folder, changes, log, progress, stop_after_steps, info)


def _run_training(recipe, folder, changes, log, progress, stop_after_steps, info):
    from ..convert import convert_with_report
    from ..data import batch_mixer, describe, open_source, timm_data_config
    from ..models import architecture_of
    from ..quant.threshold import calibrate_thresholds
    from ..sharpness import calibrate_sharpness

    out, resume, cfg = folder.path, folder.resume, recipe.train
    if changes:
        log("resume applies the changed settings " + "; ".join(
            f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    seed_everything(cfg.seed)
    source = open_source(recipe.data)
    num_classes = _num_classes(recipe, source.num_classes)
    fp_model = build_float_model(recipe, num_classes)
    # the model's data config (recipe fields override); recorded in recipe.yaml / checkpoints
    data = build_datasets_for(recipe, model=fp_model, source=source)
    recipe = dataclasses.replace(recipe, data=data.config)
    if info.is_main:
        log(describe(data.config, source.tensors))
    teacher = copy.deepcopy(fp_model).eval()
    model, report = convert_with_report(fp_model, recipe)
    if info.is_main:
        log(str(report))
    calibration = _image_batch(data.train, 64)
    if recipe.init.target_snr and resume is None:   # a resumed run loads its logits
        gains = calibrate_sharpness(model, calibration, recipe.init.target_snr)
        if gains:
            log(f"sharpened the weight distributions of {sum(g > 1 for g in gains.values())}"
                f"/{len(gains)} LR layers to a median channel SNR >= "
                f"{recipe.init.target_snr:g} (gains {min(gains.values()):g}-"
                f"{max(gains.values()):g})")
    calibrate_thresholds(model, calibration)
    baseline = {}
    if resume is None:
        baseline = {"fp_test_accuracy": evaluate(teacher, data.test, cfg.eval_batch_size,
                                                 info)["accuracy"],
                    "converted_test_accuracy": evaluate(model, data.test, cfg.eval_batch_size,
                                                        info)["accuracy"]}
        log(f"FP {recipe.model.name} test accuracy {baseline['fp_test_accuracy']:.3f}; "
            f"{_converted_label(bool(lr_layers(model)))} {baseline['converted_test_accuracy']:.3f}")
    meta = {"model": recipe.model.name, "num_classes": num_classes,
            "architecture": architecture_of(teacher), "recipe": recipe.to_dict(),
            "baseline": baseline, "data_config": timm_data_config(data.config)}
    trainer = Trainer(model, cfg, data, teacher=teacher, output_dir=out, meta=meta, info=info,
                      log=log, progress=progress, num_workers=recipe.data.num_workers,
                      mixer=batch_mixer(recipe.data, num_classes, cfg.label_smoothing))
    if resume is not None:   # Trainer.resume applies the config's learning rates etc.
        trainer.resume(resume)
        baseline = trainer.resumed_meta.get("baseline") or baseline
    if info.is_main:   # nothing is written before this point
        folder.clear()
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "recipe.yaml", recipe.to_yaml())
    trainer.fit(stop_after_steps=stop_after_steps)
    metrics = {}
    if trainer.state.epoch >= cfg.epochs:
        metrics = trainer.finalize(baseline)
        log(format_metrics(metrics))
    trainer.model.eval()
    return TrainingResult(model=trainer.model, metrics=metrics, recipe=recipe, data=data)


def build_datasets_for(recipe, model: Optional[nn.Module] = None, source=None) -> Datasets:
    """The recipe's data sets, prepared with its data config resolved against `model`
    (lr_quant.data.build_datasets), with the validation split of its train: section."""
    from ..data import build_datasets
    return build_datasets(recipe.data, recipe.train.val_fraction, recipe.train.seed, model=model,
                          source=source)


def _converted_label(lr: bool) -> str:
    return "LR at conversion (mode)" if lr else "quantized at conversion"


def format_metrics(metrics: Dict[str, Any]) -> str:
    """The test accuracies of `Trainer.finalize` (with validation ones), one per line."""
    lr = "trained_test_accuracy" not in metrics   # written for models without LR layers
    names = [("fp_test_accuracy", "full precision (teacher)"),
             ("converted_test_accuracy", _converted_label(lr)),
             ("lr_mode_test_accuracy", "LR trained, mode, training BN stats"),
             ("trained_test_accuracy", "trained, training BN stats"),
             ("frozen_test_accuracy", "frozen (mode), BN re-estimated" if lr
              else "trained, BN re-estimated"),
             ("sampled_best_test_accuracy", "best sampled network (chosen on val)")]
    lines = ["test accuracy:"]
    for key, label in names:
        if key in metrics:
            val = metrics.get(key.replace("test", "val"))
            lines.append(f"  {label:40s} {metrics[key]:.4f}"
                         + (f"   (val {val:.4f})" if isinstance(val, float) else ""))
    if "selected_network" in metrics:
        lines.append(f"  kept network: {metrics['selected_network']}")
    return "\n".join(lines)


def _recorded_recipe(meta: Dict[str, Any], path):
    from ..recipe import Recipe

    if not isinstance(meta.get("recipe"), dict):
        raise CheckpointError(f"{path} does not record its recipe; it was not written by "
                              f"lr-quant train")
    return Recipe.from_dict(meta["recipe"])


def load_trained_model(path) -> Tuple[nn.Module, Any, Dict[str, Any]]:
    """(model, recipe, meta) from a checkpoint written by training (final or not), in eval().

    The model is rebuilt from the recipe stored in the checkpoint (build_float_model
    without pretrained weights, then convert) and loaded with the checkpoint's state."""
    from ..convert import convert

    model_state, meta, _ = load_checkpoint(path)
    recipe = _recorded_recipe(meta, path)
    model = build_float_model(recipe, meta["num_classes"], pretrained=False)
    model = convert(model, recipe)
    load_model_state(model, model_state, source=str(path))
    model.eval()
    return model, recipe, meta
