"""Minimal training helpers for small in-memory tensors (kept for tests that use them).

The product's training loop is `lr_quant.train` (Trainer: optimizer groups, schedules,
KD, checkpoints, BN re-estimation); the end-to-end example is `lr-quant quickstart`
(lr_quant.quickstart). New code should use those.
"""

from __future__ import annotations

import torch
from torch import nn

from .nn import lr_regularization

__all__ = ["fit", "accuracy"]


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
