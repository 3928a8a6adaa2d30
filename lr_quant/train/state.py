"""What the training loop keeps between steps (and in checkpoints), its file names, and
the errors of a stopped run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

__all__ = ["TrainingState", "NonFiniteLossError", "LossDivergedError", "LAST_CHECKPOINT",
           "FINAL_CHECKPOINT", "PENDING_SUFFIX", "LOSS_WINDOW", "LOSS_FLOOR"]

LAST_CHECKPOINT = "checkpoint.safetensors"
FINAL_CHECKPOINT = "final.safetensors"
PENDING_SUFFIX = ".pending"   # a checkpoint whose parameters are not yet confirmed sane
LOSS_WINDOW = 20              # steps in the running median of the divergence check
LOSS_FLOOR = 1.0              # reference levels below this count as this


class NonFiniteLossError(RuntimeError):
    """Training stopped on a bad loss: NaN / inf (or, as LossDivergedError, runaway). The
    message names the last good checkpoint (kept) and the flags to continue with."""


class LossDivergedError(NonFiniteLossError):
    """The loss ran away: above train.divergence_factor x its reference level."""


@dataclass
class TrainingState:
    epoch: int = 0            # current epoch (0-based)
    step_in_epoch: int = 0    # optimizer steps done in the current epoch
    global_step: int = 0
    history: List[Dict[str, float]] = field(default_factory=list)
    # running sums of the current epoch (loss_sum, correct, count), for resume
    running: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    epoch_start_time: float = 0.0
    # divergence check: the last LOSS_WINDOW step losses, the lowest median of them so far
    loss_window: List[float] = field(default_factory=list)
    loss_best: Optional[float] = None
