"""Evaluation and BatchNorm re-estimation.

`evaluate` runs model.eval() over a data set, sharded over the ranks and all-reduced.
BatchNorm statistics gathered on stochastic training passes do not match a discrete
network: `reestimate_batchnorm` recomputes them on that network from fixed training
batches (`fixed_batches`: a seeded draw, no augmentation).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from .._tensor import as_tensor
from ..distributed import DistInfo, all_reduce_sum
from ._util import unwrap

__all__ = ["evaluate", "reestimate_batchnorm", "fixed_batches"]


def _shard(n: int, info: DistInfo) -> List[int]:
    return list(range(info.rank, n, info.world_size))


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256,
             info: DistInfo = DistInfo(), num_workers: int = 0) -> Dict[str, float]:
    """{"loss", "accuracy", "count"} of model.eval() on `dataset` (sharded over ranks,
    all-reduced). Restores the model's train/eval mode."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0.0, 0.0
    indices = _shard(len(dataset), info)
    if indices:
        loader = DataLoader(dataset, batch_sampler=[indices[i:i + batch_size]
                                                    for i in range(0, len(indices), batch_size)],
                            num_workers=num_workers)
        for x, y in loader:
            x, y = x.to(info.device), y.to(info.device)
            out = as_tensor(model(x)).float()
            loss_sum += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            count += len(y)
    loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], info.device)
    model.train(was_training)
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1), "count": count}


def _batchnorms(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Sequence[Tensor]) -> int:
    """Recompute every BatchNorm's running statistics on `batches` (cumulative average).

    Everything but the BatchNorm layers runs in eval() (frozen LR layers and sign
    activations are deterministic there); returns the number of BatchNorm layers. The
    model is left in eval().
    """
    model = unwrap(model)
    bns = _batchnorms(model)
    if not bns or not batches:
        model.eval()
        return 0
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None   # cumulative moving average over the batches
    model.eval()
    for bn in bns:
        bn.train()
    for x in batches:
        model(x)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    model.eval()
    return len(bns)


def fixed_batches(dataset: Dataset, batch_size: int, num_batches: int, seed: int,
                  device: torch.device = torch.device("cpu")) -> List[Tensor]:
    """Up to `num_batches` input batches of `batch_size` from a permutation seeded with
    `seed` (one batch of the whole set when it is smaller than a batch); inputs only."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g).tolist()
    b = batch_size
    n = min(num_batches, len(order) // b)
    if n == 0 and num_batches and len(order) >= 2:
        b, n = len(order), 1
    batches = []
    for k in range(n):
        items = [dataset[i] for i in order[k * b:(k + 1) * b]]
        batches.append(torch.stack([torch.as_tensor(x) for x, _ in items]).to(device))
    return batches
