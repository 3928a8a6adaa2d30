"""Training and data settings of a recipe (the `train:` and `data:` sections).

Plain dataclasses validated in `__post_init__`; `lr_quant.recipe.Recipe` nests them and
handles YAML/dict I/O and strict key/type checking. `lr_quant.train` consumes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

__all__ = ["TrainConfig", "DataConfig", "ScheduleConfig"]

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("cosine", "step", "constant")
DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
SCHEDULE_KINDS = ("constant", "linear", "cosine", "exponential")


def _choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {tuple(choices)}")


def _non_negative(name: str, value) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


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
    optimizer: str = "adam"
    logits_lr: float = 1e-2          # LR weight logits
    params_lr: float = 1e-3          # real-valued parameters (BN, biases, scales, thresholds, FP layers)
    weight_decay: float = 0.0        # real-valued parameters only (never the logits)
    momentum: float = 0.9            # sgd
    schedule: str = "cosine"         # per step after warmup; "step": x0.1 at 50% and 75%
    warmup_epochs: int = 0
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
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, LR_SCHEDULES)
        for name in ("epochs", "warmup_epochs", "weight_decay", "kd_weight", "beta_regularizer",
                     "logit_decay", "bn_reestimate_batches", "sampled_networks", "grad_clip",
                     "logit_clamp"):
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
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")


@dataclass
class DataConfig:
    """Where the images come from."""
    dataset: str = "digits"
    root: Optional[str] = None       # imagefolder / cifar root
    download: bool = False           # cifar: torchvision download (needs a network)
    image_size: int = 32
    num_workers: int = 0
    train_fraction: float = 1.0      # subsample the training split (harder settings)

    def __post_init__(self):
        _choice("dataset", self.dataset, DATASETS)
        if self.dataset == "imagefolder" and not self.root:
            raise ValueError("dataset 'imagefolder' needs data.root")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
