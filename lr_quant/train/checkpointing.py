"""The Trainer's checkpoints: the pending -> confirmed checkpoint protocol, saving the
training state (optimizer, scheduler, RNG per rank), and resuming from it (with this
config's optimizer hyper-parameters applied). See lr_quant.train.trainer."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from ..checkpoint import (CheckpointError, capture_rng_state, load_checkpoint, load_model_state,
                          restore_rng_state, save_checkpoint)
from ..nn.lr_layers import lr_layers
from ._util import seed_everything
from .optim import restore_scheduler, scheduler_state
from .state import LAST_CHECKPOINT, PENDING_SUFFIX, TrainingState

__all__ = ["CheckpointingMixin"]


class CheckpointingMixin:
    """Checkpoint methods of :class:`lr_quant.train.trainer.Trainer`."""

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Optional[Path]:
        return self.output_dir / LAST_CHECKPOINT if self.output_dir else None

    @property
    def _pending_path(self) -> Optional[Path]:
        path = self.checkpoint_path
        return path.with_name(path.name + PENDING_SUFFIX) if path else None

    def _training_state(self) -> Dict[str, Any]:
        rng = capture_rng_state()
        if self.info.distributed:
            gathered = [None] * self.info.world_size
            dist.all_gather_object(gathered, rng)
            rng_per_rank = gathered
        else:
            rng_per_rank = [rng]
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": scheduler_state(self.scheduler),
                "rng_per_rank": rng_per_rank}

    def _meta(self, **extra) -> Dict[str, Any]:
        s = self.state
        return {**self.meta, "epoch": s.epoch, "step_in_epoch": s.step_in_epoch,
                "global_step": s.global_step, "history": s.history, "running": s.running,
                "loss_window": s.loss_window, "loss_best": s.loss_best,
                "world_size": self.info.world_size, "train": asdict(self.config), **extra}

    def save(self, path: Optional[Path] = None, **extra) -> Optional[Path]:
        """Checkpoint the training state (rank 0 writes; all ranks must call it).

        Without `path`, the training checkpoint goes to checkpoint.safetensors.pending and
        becomes checkpoint.safetensors once confirmed (see the module docstring). NaN / inf
        parameters raise NonFiniteLossError instead (nothing written)."""
        self._check_parameters()
        state = self._training_state()   # collective under DDP
        with torch.no_grad():   # store the current mode as the materialized weight
            for _, layer in lr_layers(self.model):
                if not layer.is_lr_frozen:
                    layer.materialize_weight()
        if path is None and self.checkpoint_path is not None:
            if not self.info.is_main:
                return self._pending_path
            self._drop_pending()   # superseded (same parameters, older metadata)
            save_checkpoint(self._pending_path, self.model, self._meta(**extra), state)
            self._pending_step = self.state.global_step
            return self._pending_path
        if path is None or not self.info.is_main:
            return path
        return save_checkpoint(path, self.model, self._meta(**extra), state)

    def _commit(self) -> None:
        """The pending checkpoint becomes checkpoint.safetensors (rank 0)."""
        if self._pending_step is not None and self.info.is_main:
            self._pending_path.replace(self.checkpoint_path)
            self._good_step = self._pending_step
        self._pending_step = None

    def _drop_pending(self) -> None:
        if self._pending_path is not None and self.info.is_main:
            self._pending_path.unlink(missing_ok=True)
        self._pending_step = None

    def resume(self, path) -> None:
        """Continue from a checkpoint written by `save` (same model, recipe and data)."""
        model_state, meta, state = load_checkpoint(path)
        self.resumed_meta = meta
        arch = self.meta.get("architecture")
        load_model_state(self.model, model_state, source=str(path),
                         architecture=meta.get("architecture"), expected_architecture=arch)
        if meta.get("frozen"):
            raise CheckpointError(f"{path} holds a frozen (final) network; resume from "
                                  f"{LAST_CHECKPOINT}, or evaluate / export it instead")
        # Loading may replace parameter objects (Brevitas re-initializes activation proxies
        # on load, with their threshold parameters): build the optimizer on the loaded model.
        self._build_optimizer()
        configured = [{k: v for k, v in g.items() if k != "params"}
                      for g in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: optimizer state does not fit ({e})") from e
        self._apply_hyperparameters(configured, state.get("scheduler") or {}, meta)
        self.state = TrainingState(epoch=meta["epoch"], step_in_epoch=meta["step_in_epoch"],
                            global_step=meta["global_step"], history=meta["history"],
                            running=meta.get("running", [0.0, 0.0, 0.0]),
                            epoch_start_time=time.time(),
                            loss_window=meta.get("loss_window", []),
                            loss_best=meta.get("loss_best"))
        same = self.checkpoint_path is not None and Path(path).resolve() == \
            self.checkpoint_path.resolve()
        self._good_step = self.state.global_step if same else None
        rngs = state["rng_per_rank"]
        if len(rngs) == self.info.world_size:
            restore_rng_state(rngs[self.info.rank])
        else:   # another number of processes: fresh, distinct noise per rank
            seed_everything(self.config.seed + self.info.rank + 7919 * self.state.global_step)
        self.log(f"resumed from {path} at epoch {self.state.epoch + 1}, step "
                 f"{self.state.global_step}/{self.total_steps}")

    def _apply_hyperparameters(self, configured: List[Dict[str, Any]],
                               scheduler_saved: Dict[str, Any], meta: Dict[str, Any]) -> None:
        """Replace the hyper-parameters a loaded optimizer state brought (its param groups:
        lr, weight_decay, momentum, ...) by this config's (`configured`: the groups of a
        freshly built optimizer), with this config's schedule (built with the optimizer) at
        the restored position (lr_quant.train.optim.restore_scheduler; `scheduler_saved`:
        the checkpoint's scheduler state). Unchanged config: the same values, so resume
        stays bit-exact."""
        saved = [{"lr": g["lr"], "initial_lr": g.get("initial_lr", g["lr"])}
                 for g in self.optimizer.param_groups]
        for group, new in zip(self.optimizer.param_groups, configured):
            group.update(new)
        restore_scheduler(self.scheduler, scheduler_saved, meta["global_step"], meta["epoch"],
                          saved)
