"""Distributed data parallel helpers: the same `lr-quant train` under `torchrun`.

`torchrun --nproc_per_node N -m lr_quant.cli train ...` sets RANK / WORLD_SIZE /
LOCAL_RANK; `init_distributed()` then joins the process group (NCCL on GPUs, gloo on
CPUs). Without those variables everything runs in one process.

Conventions (lr_quant.train.trainer): the global batch `train.batch_size` is split evenly
over the ranks; every rank draws its own LR / sign noise (torch seeded with seed + rank),
so ranks sample independent networks; metrics are all-reduced sums; only rank 0 writes
checkpoints, logs and plots.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "all_reduce_sum",
           "barrier", "broadcast_object"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one; returns this process's DistInfo."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(device=torch.device("cuda" if use_cuda else "cpu"))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup_distributed() -> None:
    """Leave the process group; all ranks meet first, since gloo can abort a rank that
    tears down while another still uses the group or its store (seen as SIGABRT). Unreached
    objects holding the group (a DDP wrapper in a reference cycle) are collected first, so
    the group is destroyed now rather than during interpreter shutdown."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values, device: torch.device = torch.device("cpu")):
    """Sum a list of floats over the ranks (identity in one process)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj
