"""Recipe overrides as a command line gives them: ``section.key`` paths with YAML values.

    recipe = apply_overrides("quickstart", {"train.epochs": "3"}, ["weights.conv=lr_ternary"])

:func:`scalar_fields` lists the overridable scalar keys of the recipe sections
(:data:`OVERRIDE_SECTIONS`) with :data:`FIELD_HELP` as their one-line help; values are
read by :func:`parse_value` (YAML, plus 1e-3 style floats) and set by :func:`set_path`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, Iterable, Mapping, Optional

from .schema import RecipeError

__all__ = ["OVERRIDE_SECTIONS", "FIELD_HELP", "parse_value", "scalar_fields", "set_path",
           "apply_overrides"]

OVERRIDE_SECTIONS = ("model", "train", "data", "init")
FIELD_HELP = {
    "model.name": "timm model name, e.g. resnet18",
    "model.pretrained": "timm hub weights (needs a network)",
    "model.checkpoint": "local FP weight file (.safetensors / .pth) loaded through timm",
    "train.epochs": "fine-tuning epochs",
    "train.batch_size": "global batch size (split over torchrun processes)",
    "train.logits_lr": "learning rate of the LR weight logits (no weight decay)",
    "train.params_lr": "learning rate of real-valued parameters (BN, scales, thresholds, FP layers)",
    "train.optimizer": "any timm optimizer (timm.optim.list_optimizers()), e.g. adam, adamw, "
                       "sgd, lamb, lion",
    "train.optimizer_kwargs": "more options of the timm optimizer, e.g. '{betas: [0.9, 0.95]}'",
    "train.layer_decay": "timm layer-wise lr decay of the real-valued parameters (not the logits)",
    "train.schedule": "timm lr schedule: cosine | tanh | step | multistep | plateau | poly | "
                      "wsd | rsqrt | constant",
    "train.warmup_epochs": "linear warmup from train.warmup_lr to the base learning rates",
    "train.warmup_lr": "learning rate at the start of warmup (absolute, every group)",
    "train.min_lr": "end of cosine / tanh / poly / wsd, floor of plateau (absolute)",
    "train.decay_epochs": "step: decay every N epochs (required); wsd: length of the decay",
    "train.decay_milestones": "multistep: epochs to decay at (required), e.g. '[30, 60]'",
    "train.decay_rate": "step / multistep / plateau factor; poly: the power",
    "train.schedule_kwargs": "more timm schedule options, e.g. '{noise: [0.5], patience_epochs: 2}'",
    "train.kd_weight": "0..1: (1-w) CE + w KD from the FP model",
    "train.beta_regularizer": "binary layers: weight of sum p(1-p)",
    "train.logit_decay": "ternary / categorical layers: weight of ||logits||^2",
    "train.logit_clamp": "clamp logits to +-value after each step",
    "train.sampled_networks": "K sampled networks compared with the mode on validation",
    "train.bn_reestimate_batches": "training batches for BatchNorm re-estimation after freezing",
    "train.val_fraction": "validation split carved from the training data",
    "train.amp": "autocast to bfloat16",
    "train.flush_denormal": "CPU: flush subnormal floats to zero while training (faster W1A1)",
    "train.compile": "torch.compile the LR / sign training math (fused passes; compiles first)",
    "train.checkpoint_every": "also checkpoint every N steps (0: each epoch)",
    "data.dataset": "digits | imagefolder | cifar10 | cifar100 | torch/<name> | hfds/<name or folder>",
    "data.root": "data folder (imagefolder: root/train/<class>, root/val/<class>; hfds: cache)",
    "data.download": "torch/*: download with torchvision (needs a network)",
    "data.test_split": "the reported split (null: val, validation or test, the first present)",
    "data.image_size": "input size (null: the model's pretrained_cfg)",
    "data.interpolation": "resize interpolation (null: the model's pretrained_cfg)",
    "data.crop_pct": "eval center-crop fraction (null: the model's pretrained_cfg)",
    "data.auto_augment": "timm policy, e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, v0",
    "data.re_prob": "random erasing probability",
    "data.mixup": "mixup alpha (0: off); soft targets, the KD teacher sees the mixed batch",
    "data.cutmix": "cutmix alpha (0: off)",
    "train.label_smoothing": "cross-entropy label smoothing (with mixup: smoothed mixed targets)",
}

def parse_value(text: str) -> Any:
    """A command-line value as YAML would read it, with 1e-3 style floats too."""
    import yaml

    low = text.strip().lower()
    if low in ("none", "null", "~"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def scalar_fields(cls, prefix: str):
    """(dotted path, type, default) for every scalar field of a dataclass, recursively, and
    for its list / mapping fields (type list / dict: a YAML value on the command line)."""
    hints = typing.get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from scalar_fields(tp, path)
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base = args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp
        if base in (int, float, str, bool):
            yield path, base, getattr(default, f.name)
        elif typing.get_origin(base) in (list, dict):
            yield path, typing.get_origin(base), getattr(default, f.name)


def set_path(tree: Dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    node = tree
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {} if node.get(key) is None else node[key]
            if not isinstance(node[key], dict):
                raise RecipeError(path, f"{key} is not a section")
        node = node[key]
    node[keys[-1]] = value


def apply_overrides(recipe, values: Optional[Mapping[str, Any]] = None,
                    sets: Iterable[str] = ()) -> "Recipe":
    """`recipe` (a Recipe, a packaged name or a YAML path; None: the defaults) with
    ``values`` ({"train.epochs": "3"}: strings parsed by parse_value, other values as
    they are) and then ``sets`` ("KEY=VALUE" items) applied, validated."""
    from .recipe import Recipe, load_recipe

    base = load_recipe(recipe).to_dict() if recipe is not None else Recipe().to_dict()
    for path, value in (values or {}).items():
        set_path(base, path, parse_value(value) if isinstance(value, str) else value)
    for item in sets:
        if "=" not in item:
            raise RecipeError("", f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        set_path(base, key.strip(), parse_value(value))
    return Recipe.from_dict(base)
