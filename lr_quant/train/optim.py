"""Optimizer and schedules, through timm's factories.

Optimizer (`build_optimizer`: timm.optim.create_optimizer_v2, any name of
timm.optim.list_optimizers()): the LR logits in their own group ("logits_lr": lr
`logits_lr`, never weight decay), and the real-valued parameters in timm's groups at
`params_lr`: weight decay / no weight decay ("params" / "params_no_decay": 1-d tensors,
biases and the model's `no_weight_decay()` get none), or timm's layer-wise lr-decay groups
("layer_group{i}", each with its `lr_scale`) when `layer_decay` is set.

Learning rate (`build_scheduler`: timm.scheduler.create_scheduler_v2): stepped after every
optimizer step (`scheduler.step_update(steps done)`), except "plateau", which timm steps per
epoch (`scheduler.step(epoch, val accuracy)` at each epoch end). `scheduler_state` /
`restore_scheduler` carry it through a checkpoint. Sign temperature / noise and sharpness
follow `ParamSchedule`s over all steps (`make_schedule`).
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from typing import Any, Dict, List

import torch
from torch import nn

from ..nn.lr_layers import lr_layers
from ..schedule import ParamSchedule
from ..train_config import ScheduleConfig, TrainConfig
from ._util import unwrap

__all__ = ["param_groups", "build_optimizer", "build_scheduler", "scheduler_state",
           "restore_scheduler", "current_lrs", "make_schedule"]

LOGITS_GROUP = "logits_lr"


def param_groups(model: nn.Module, config: TrainConfig) -> List[Dict[str, Any]]:
    """[LR logits (lr logits_lr, no decay), then the real-valued parameters in timm's
    groups: "params" (weight_decay) and "params_no_decay", or timm's layer-decay groups
    ("layer_group{i}" with lr_scale) when config.layer_decay is set]. Groups without a
    trainable parameter are left out; the real-valued groups take params_lr from the
    optimizer's default."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    model = unwrap(model)
    logits = [p for _, layer in lr_layers(model) for p in layer.lr_parameters()
              if p.requires_grad]
    lr_ids = {id(p) for p in logits}
    no_weight_decay = getattr(model, "no_weight_decay", lambda: set())()
    if config.layer_decay is not None:
        timm_groups = param_groups_layer_decay(model, weight_decay=config.weight_decay,
                                               no_weight_decay_list=no_weight_decay,
                                               layer_decay=config.layer_decay)
        for i, g in enumerate(timm_groups):
            g["name"] = f"layer_group{i}"
    else:
        # timm puts everything in the no-decay group when weight_decay is 0: split with a
        # placeholder so that the groups (and a checkpoint's optimizer state) do not depend
        # on the weight_decay value, which a resumed run may change.
        timm_groups = param_groups_weight_decay(model, weight_decay=1.0,
                                                no_weight_decay_list=no_weight_decay)
        for g in timm_groups:
            decay = g["weight_decay"] > 0
            g["name"] = "params" if decay else "params_no_decay"
            g["weight_decay"] = config.weight_decay if decay else 0.0
        timm_groups.sort(key=lambda g: g["name"] != "params")   # as before: decay first
    for g in timm_groups:
        g["params"] = [p for p in g["params"] if id(p) not in lr_ids]
    groups = [dict(params=logits, lr=config.logits_lr, weight_decay=0.0, name=LOGITS_GROUP),
              *timm_groups]
    return [g for g in groups if g["params"]]


def _check_buildable(name: str) -> None:
    """A clear error for timm optimizers that cannot run here."""
    from timm.optim import get_optimizer_info

    info = get_optimizer_info(name.lower().split("_")[-1])
    if isinstance(info.opt_class, str):   # apex / bitsandbytes, imported on demand
        package = info.opt_class.split(".")[0]
        if importlib.util.find_spec(package) is None:
            hint = ("pip install bitsandbytes" if package == "bitsandbytes"
                    else "https://github.com/NVIDIA/apex")
            raise ValueError(f"optimizer={name!r} needs the {package!r} package, which is not "
                             f"installed ({hint}), and a CUDA device")
        if not torch.cuda.is_available():
            raise ValueError(f"optimizer={name!r} ({package}) needs a CUDA device")
    if info.second_order:
        raise ValueError(f"optimizer={name!r} needs second-order gradients (a backward with "
                         f"create_graph=True), which lr_quant's training step does not compute")


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """timm.optim.create_optimizer_v2(config.optimizer) over `param_groups`, with
    `params_lr`, `weight_decay`, `momentum` (optimizers that have one) and
    `optimizer_kwargs` (betas, eps, ...)."""
    from timm.optim import create_optimizer_v2

    groups = param_groups(model, config)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    _check_buildable(config.optimizer)
    try:
        return create_optimizer_v2(groups, opt=config.optimizer, lr=config.params_lr,
                                   weight_decay=config.weight_decay, momentum=config.momentum,
                                   **config.optimizer_kwargs)
    except TypeError as e:   # an option the optimizer does not take
        raise ValueError(f"optimizer={config.optimizer!r} with optimizer_kwargs="
                         f"{config.optimizer_kwargs}: {e}") from e


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    steps_per_epoch: int):
    """The timm scheduler of config.schedule: per optimizer step (step_update), "plateau"
    per epoch (step(epoch, metric), mode "max": the validation accuracy). "constant":
    the base rates after warmup (timm's step schedule without decay)."""
    from timm.scheduler import create_scheduler_v2

    sched, decay_rate, per_epoch = config.schedule, config.decay_rate, config.schedule == "plateau"
    if sched == "constant":
        sched, decay_rate = "step", 1.0
    kwargs = dict(noise_seed=config.seed, **config.schedule_kwargs)
    with warnings.catch_warnings():
        # plateau: timm deprecates it because it does not checkpoint the plateau state;
        # scheduler_state / restore_scheduler do
        warnings.filterwarnings("ignore", "PlateauLRScheduler is deprecated", FutureWarning)
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=sched, num_epochs=config.epochs, warmup_epochs=config.warmup_epochs,
            min_lr=config.min_lr, warmup_lr=config.warmup_lr,
            decay_epochs=config.decay_epochs or None, decay_milestones=config.decay_milestones,
            decay_rate=decay_rate, plateau_mode="max", step_on_epochs=per_epoch,
            updates_per_epoch=steps_per_epoch, **kwargs)
    scheduler.step_update(0)   # step 0 at the schedule's value there (timm starts at the base)
    return scheduler


def _is_plateau(scheduler) -> bool:
    return hasattr(scheduler, "lr_scheduler")   # timm's PlateauLRScheduler wraps torch's


PLATEAU_COUNTERS = ("best", "num_bad_epochs", "cooldown_counter", "last_epoch")


def scheduler_state(scheduler) -> Dict[str, Any]:
    """What a checkpoint needs besides the step: plateau's counters (timm saves only some);
    the other schedules are functions of the step."""
    if not _is_plateau(scheduler):
        return {}
    inner = scheduler.lr_scheduler
    return {**{k: getattr(inner, k) for k in PLATEAU_COUNTERS},
            "restore_lr": scheduler.restore_lr}


def restore_scheduler(scheduler, state: Dict[str, Any], global_step: int, epoch: int,
                      saved_groups: List[Dict[str, Any]]) -> None:
    """Set the learning rates of `scheduler`'s optimizer (already carrying this config's
    hyper-parameters) at the restored position: per-step schedules at `global_step`;
    plateau: its warmup at `epoch`, after it the saved rates rescaled by new / saved base
    rate (`saved_groups`: {"lr", "initial_lr"} of the checkpoint's groups), with its
    counters from `state`. An unchanged config gives the saved rates exactly."""
    if not _is_plateau(scheduler):
        scheduler.step_update(global_step)
        return
    if scheduler.warmup_t and epoch <= scheduler.warmup_t:
        scheduler.step(epoch)
        return
    groups = scheduler.optimizer.param_groups
    ratios = [g["initial_lr"] / s.get("initial_lr", s["lr"]) for g, s in zip(groups, saved_groups)]
    for g, s, r in zip(groups, saved_groups, ratios):
        g["lr"] = s["lr"] * r
    if state.get("restore_lr") is not None:
        scheduler.restore_lr = [lr * r for lr, r in zip(state["restore_lr"], ratios)]
    for k in PLATEAU_COUNTERS:
        if k in state:
            setattr(scheduler.lr_scheduler, k, state[k])
    scheduler.lr_scheduler._last_lr = [g["lr"] for g in groups]


def current_lrs(optimizer: torch.optim.Optimizer) -> Dict[str, float]:
    """{"lr": the real-valued parameters' rate (before a layer-decay lr_scale),
    "logits_lr": the LR logits' rate}; NaN for a group the model does not have."""
    logits = [g for g in optimizer.param_groups if g.get("name") == LOGITS_GROUP]
    real = [g for g in optimizer.param_groups if g.get("name") != LOGITS_GROUP]
    return {"lr": real[0]["lr"] / real[0].get("lr_scale", 1.0) if real else math.nan,
            "logits_lr": logits[0]["lr"] if logits else math.nan}


def make_schedule(config: ScheduleConfig, total_steps: int) -> ParamSchedule:
    """The ParamSchedule of a {start, end, kind} config over `total_steps` steps."""
    return ParamSchedule(config.start, config.end, max(1, total_steps), config.kind)
