"""Fine-tune a converted model from its pretrained full-precision weights.

    result = run_training(recipe, "runs/x")       # recipe level: `lr-quant train`
    trainer = Trainer(model, TrainConfig(...), datasets, teacher=fp_model, output_dir="run")
    trainer.fit(); metrics = trainer.finalize()   # library level

Modules (one concept each):
    losses      CE + KD + LR regularizers
    optim       optimizer groups, timm optimizers and learning-rate schedules, sign schedules
    evaluation  evaluate, BatchNorm re-estimation on fixed training batches
    selection   the deployed network after training (freeze, sampled networks) + accuracies
    trainer     the Trainer loop: steps, epochs, checkpoints, resume, DDP
    plots       history.json / history.csv / curves.png
    pipeline    recipe-level entry points: run_training, load_trained_model, ...
"""

from ._util import seed_everything, unwrap
from .evaluation import evaluate, fixed_batches, reestimate_batchnorm
from .losses import distillation_loss, regularization
from .optim import build_optimizer, build_scheduler, make_schedule, param_groups
from .pipeline import (TrainingResult, build_datasets_for, build_float_model,
                       estimate_checkpoint_bytes, format_metrics, load_trained_model,
                       resume_changes, run_training)
from .plots import plot_history, write_history
from .selection import NO_LR_NETWORK, choose_sampled_network, deploy, select_network
from .trainer import (FINAL_CHECKPOINT, LAST_CHECKPOINT, LossDivergedError, NonFiniteLossError,
                      Trainer)

__all__ = ["Trainer", "NonFiniteLossError", "LossDivergedError", "param_groups",
           "build_optimizer", "build_scheduler", "make_schedule", "regularization", "distillation_loss",
           "reestimate_batchnorm", "evaluate", "fixed_batches", "seed_everything", "unwrap",
           "LAST_CHECKPOINT", "FINAL_CHECKPOINT", "select_network", "deploy",
           "choose_sampled_network", "NO_LR_NETWORK", "plot_history", "write_history",
           "TrainingResult", "run_training", "build_float_model", "build_datasets_for",
           "format_metrics", "load_trained_model", "resume_changes",
           "estimate_checkpoint_bytes"]
