"""Training and data settings of a recipe (the `train:` and `data:` sections).

Plain dataclasses validated in `__post_init__`; `lr_quant.recipe.Recipe` nests them and
handles YAML/dict I/O and strict key/type checking. `lr_quant.train` consumes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .data.config import DataConfig  # the data: section (re-exported here)

__all__ = ["TrainConfig", "DataConfig", "ScheduleConfig", "timm_optimizers", "timm_schedules"]

SCHEDULE_KINDS = ("constant", "linear", "cosine", "exponential")


def _choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {tuple(choices)}")


def _non_negative(name: str, value) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def timm_optimizers() -> List[str]:
    """The optimizer names train.optimizer accepts: timm.optim.list_optimizers() (timm's
    "lookahead_<name>" wrapper too)."""
    from timm.optim import list_optimizers

    return list_optimizers()


def timm_schedules() -> List[str]:
    """The learning-rate schedules train.schedule accepts: the names of
    timm.scheduler.create_scheduler_v2 ("constant": the base rates after warmup; "wsd" /
    "rsqrt" with the timm versions that have them). "plateau" is stepped per epoch."""
    import timm.scheduler

    names = ["cosine", "tanh", "step", "multistep", "plateau", "poly", "constant"]
    return names + (["wsd", "rsqrt"] if hasattr(timm.scheduler, "WSDLRScheduler") else [])


# create_scheduler_v2 arguments that TrainConfig fields or the trainer set
_SCHEDULE_ARGS_SET = {"optimizer": None, "sched": "schedule", "num_epochs": "epochs",
                      "decay_epochs": "decay_epochs", "decay_milestones": "decay_milestones",
                      "decay_rate": "decay_rate", "min_lr": "min_lr", "warmup_lr": "warmup_lr",
                      "warmup_epochs": "warmup_epochs", "step_on_epochs": None,
                      "updates_per_epoch": None, "plateau_mode": None,
                      "cooldown_epochs": "epochs"}
# create_optimizer_v2 arguments that TrainConfig fields set (or that need a model)
_OPTIMIZER_ARGS_SET = {"lr": "params_lr / logits_lr", "weight_decay": "weight_decay",
                       "momentum": "momentum", "layer_decay": "layer_decay",
                       "filter_bias_and_bn": None, "param_group_fn": None, "fallback_list": None,
                       "fallback_no_weight_decay": None, "layer_decay_min_scale": None,
                       "layer_decay_no_opt_scale": None}


def _check_kwargs(name: str, kwargs: Dict[str, Any], reserved: Dict[str, Optional[str]],
                  valid=None) -> None:
    from .schema import did_you_mean

    for key in kwargs:
        if key in reserved:
            field_name = reserved[key]
            raise ValueError(f"{name}: {key!r} is set by " + (
                f"train.{field_name}" if field_name else "lr_quant") + f", not {name}")
        if valid is not None and key not in valid:
            raise ValueError(f"{name}: unknown key {key!r}; valid keys: {sorted(valid)}"
                             f"{did_you_mean(str(key), valid)}")


@dataclass
class ScheduleConfig:
    """A scalar schedule from `start` to `end` over the training steps (temperature, sigma_a)."""
    start: float = 1.0
    end: float = 1.0
    kind: str = "constant"

    def __post_init__(self):
        _choice("kind", self.kind, SCHEDULE_KINDS)
        if self.start <= 0 or self.end <= 0:
            raise ValueError(f"schedule values must be > 0, got start={self.start}, end={self.end}")


@dataclass
class TrainConfig:
    """Fine-tuning hyper-parameters (see lr_quant.train)."""
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adam"          # any timm optimizer (timm.optim.list_optimizers())
    logits_lr: float = 1e-2          # LR weight logits
    params_lr: float = 1e-3          # real-valued parameters (BN, biases, scales, thresholds, FP layers)
    weight_decay: float = 0.0        # real-valued parameters only (never the logits)
    momentum: float = 0.9            # optimizers with momentum (sgd: Nesterov)
    optimizer_kwargs: Dict[str, Any] = field(default_factory=dict)   # betas, eps, ... (timm)
    layer_decay: Optional[float] = None   # timm layer-wise lr decay of the real-valued params
    # learning-rate schedule (timm.scheduler.create_scheduler_v2), per optimizer step
    # ("plateau": per epoch, on the validation accuracy); see timm_schedules()
    schedule: str = "cosine"
    warmup_epochs: int = 0           # linear warmup from warmup_lr to the base rates
    warmup_lr: float = 0.0           # absolute; 0 keeps the logits / params ratio in warmup
    min_lr: float = 0.0              # cosine / tanh / poly / wsd end, plateau floor
    decay_epochs: float = 0          # step: decay every N epochs (required); wsd: decay phase
    decay_milestones: List[float] = field(default_factory=list)   # multistep (required)
    decay_rate: float = 0.1          # step / multistep / plateau factor; poly: the power
    schedule_kwargs: Dict[str, Any] = field(default_factory=dict)  # noise, cycle_*, k_decay, ...
    grad_clip: Optional[float] = None
    amp: bool = False                # autocast (bf16 on CPU, fp16 on CUDA)
    # CPU: flush subnormal floats to zero while fitting (torch.set_flush_denormal, process
    # wide, switched off again after fit). The sign / LR moment paths produce a few
    # subnormals (Phi tails, exp) that put oneDNN convolutions on a slow path; flushing
    # them changes values below 1.2e-38 only. Measured: resnet18 W1A1 step -34%.
    flush_denormal: bool = True
    # torch.compile each LR layer's and stochastic sign's training math while fitting
    # (lr_quant.compile_regions): fused elementwise passes, same distribution of results; costs a
    # compilation (about 1-2 min on a CPU per model) at the first steps.
    compile: bool = False
    seed: int = 0
    kd_weight: float = 0.0           # in [0, 1]: (1 - w) CE + w T^2 KL(teacher || student)
    kd_temperature: float = 4.0
    # CE against (1 - eps) one-hot + eps / classes (with data.mixup / cutmix: smoothed mixed
    # targets, timm's Mixup)
    label_smoothing: float = 0.0
    beta_regularizer: float = 0.0    # binary: sum p(1-p)
    logit_decay: float = 0.0         # ternary / categorical: L2 on the logits
    logit_clamp: Optional[float] = None
    bn_reestimate_batches: int = 20  # BN re-estimation on the frozen network
    sampled_networks: int = 0        # K sampled networks compared on the validation split
    val_fraction: float = 0.1
    val_frozen: bool = True          # per-epoch val of a frozen copy (mode, BN re-estimated)
    sign_temperature: ScheduleConfig = field(default_factory=ScheduleConfig)
    sign_noise_std: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(0.5, 0.5))
    # g of every LR layer: training uses the tempered distribution p^g / sum p^g (same mode,
    # lower entropy); raised over training, what is trained converges to the deployed mode.
    sharpness: ScheduleConfig = field(default_factory=ScheduleConfig)
    log_every: int = 50              # progress-bar postfix refresh, in steps
    checkpoint_every: int = 0        # also checkpoint every N steps (0: once per epoch)
    # stop (LossDivergedError) when a step's loss exceeds this x max(1, the lowest running
    # median of 20 step losses so far); 0 disables. NaN / inf losses always stop.
    divergence_factor: float = 100.0
    eval_batch_size: int = 256
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("epochs", "warmup_epochs", "weight_decay", "kd_weight", "beta_regularizer",
                     "logit_decay", "bn_reestimate_batches", "sampled_networks", "grad_clip",
                     "logit_clamp", "warmup_lr", "min_lr", "decay_epochs"):
            _non_negative(name, getattr(self, name))
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.logits_lr > 0 and self.params_lr > 0):
            raise ValueError("logits_lr and params_lr must be > 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.kd_weight > 1:
            raise ValueError(f"kd_weight must be in [0, 1] (loss = (1 - kd_weight) * CE + "
                             f"kd_weight * KD), got {self.kd_weight}")
        if self.divergence_factor != 0 and not self.divergence_factor > 1:
            raise ValueError(f"divergence_factor must be > 1 (or 0: off), got "
                             f"{self.divergence_factor}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        self._check_optimization()

    def _check_optimization(self) -> None:
        """timm optimizer / schedule names and options (messages start with the field)."""
        import inspect

        from timm.scheduler import create_scheduler_v2

        from .schema import did_you_mean

        names = timm_optimizers()
        base = self.optimizer.lower()
        if base.startswith("lookahead_"):
            base = base[len("lookahead_"):]
        if base not in names:
            raise ValueError(f"optimizer={self.optimizer!r} is not a timm optimizer"
                             f"{did_you_mean(self.optimizer.lower(), names)}; choices: "
                             f"timm.optim.list_optimizers() ({len(names)} names, e.g. adam, "
                             f"adamw, sgd, lamb, lion)")
        schedules = timm_schedules()
        if self.schedule not in schedules:
            raise ValueError(f"schedule={self.schedule!r} is not one of {schedules}"
                             f"{did_you_mean(self.schedule, schedules)}")
        if self.schedule == "step" and not self.decay_epochs > 0:
            raise ValueError("decay_epochs must be > 0 with schedule 'step' (decay by "
                             "decay_rate every decay_epochs epochs)")
        if self.schedule == "multistep" and (
                not self.decay_milestones or list(self.decay_milestones) !=
                sorted(self.decay_milestones)):
            raise ValueError(f"decay_milestones must be increasing epochs (at least one) with "
                             f"schedule 'multistep', got {self.decay_milestones}")
        if self.schedule == "plateau" and self.val_fraction == 0:
            raise ValueError("schedule 'plateau' steps on the validation accuracy: it needs "
                             "val_fraction > 0")
        if not self.decay_rate > 0:
            raise ValueError(f"decay_rate must be > 0, got {self.decay_rate}")
        if self.layer_decay is not None and not self.layer_decay > 0:
            raise ValueError(f"layer_decay must be > 0 (or null: off), got {self.layer_decay}")
        _check_kwargs("optimizer_kwargs", self.optimizer_kwargs, _OPTIMIZER_ARGS_SET)
        valid = set(inspect.signature(create_scheduler_v2).parameters) - set(_SCHEDULE_ARGS_SET)
        _check_kwargs("schedule_kwargs", self.schedule_kwargs, _SCHEDULE_ARGS_SET, valid)
