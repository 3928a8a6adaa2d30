"""The training loss terms (the Trainer sums them per step, mean over the global batch):

    (1 - kd_weight) * classification_loss(student, y, label_smoothing)
    + kd_weight * distillation_loss(student, teacher, T)
    + regularization(model, beta_regularizer, logit_decay)

the student forward is the LR forward (local reparameterization sample) in train(); the
teacher is the FP model before conversion (a deep copy, eval mode, no gradient). With
mixup / cutmix (data.mixup, data.cutmix) the student and the teacher see the same mixed
batch and y is the mixed soft target.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn
from torch.nn import functional as F

from ..nn.lr_layers import lr_layers
from ._util import unwrap

__all__ = ["classification_loss", "distillation_loss", "regularization"]


def classification_loss(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy, mean over the batch. `target`: class indices (smoothed: the one-hot
    target becomes (1 - eps) one-hot + eps / classes, Szegedy et al. 2016) or per-class
    probabilities (mixup / cutmix targets, already smoothed by timm's Mixup)."""
    soft = target.ndim == logits.ndim
    return F.cross_entropy(logits, target, label_smoothing=0.0 if soft else label_smoothing)


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Hinton KD: T^2 * KL(softmax(teacher/T) || softmax(student/T)), mean over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, dim=1), F.log_softmax(teacher.float() / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


def regularization(model: nn.Module, beta: float, logit_decay: float) -> Optional[Tensor]:
    """beta * sum p(1-p) over binary LR layers (Shayer's beta term) + logit_decay *
    ||logits||^2 over ternary / categorical ones; None when no term applies."""
    total = None
    for _, layer in lr_layers(unwrap(model)):
        weight = beta if layer.lr_distribution.name == "binary" else logit_decay
        if weight:
            term = weight * layer.lr_regularizer()
            total = term if total is None else total + term
    return total
