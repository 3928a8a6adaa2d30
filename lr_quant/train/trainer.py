"""The fine-tuning loop: `Trainer`.

    trainer = Trainer(lr_model, TrainConfig(...), datasets, teacher=fp_model, output_dir="run")
    trainer.fit()                 # epochs of training, checkpoints, logs, curves
    metrics = trainer.finalize()  # deployed network (frozen, BN re-estimated) + accuracies

Each step minimizes the loss of lr_quant.train.losses (CE, KD from the teacher, LR
regularizers) with the optimizer and per-step schedules of lr_quant.train.optim; logits
are clamped to +-logit_clamp after every step. On CPU, subnormal floats are flushed to
zero while fitting (``flush_denormal``); ``compile`` runs every LR layer's and stochastic
sign's training math as a torch.compile region while fitting (lr_quant.compile_regions).

`finalize` builds the deployed network and reports its accuracies (metric names in
lr_quant.train.selection): fp_* (the FP teacher) and converted_* (right after conversion)
come from `baseline`; LR models report lr_mode_*, frozen_*, sampled_*; models without LR
layers trained_* and frozen_*; all report selected_network and final_test_accuracy.

Data order: epoch e visits a permutation drawn from a generator seeded with (seed, e), in
global batches of `batch_size` (last partial batch dropped); under DDP rank r takes every
world_size-th sample of each global batch. Resuming re-creates the permutation and skips
the batches already done, and restores the torch / numpy / python RNG states (per rank),
so a resumed CPU run reproduces the uninterrupted one bit for bit. Resuming applies this
config's optimizer hyper-parameters (learning rates, weight decay, ...) to the restored
optimizer state, so a run can be continued with lower learning rates.

Guards (docs/training.md): every step's loss is checked before its update. A NaN / inf
loss raises NonFiniteLossError; a runaway loss, above ``divergence_factor`` x max(best, 1)
with best the lowest median of LOSS_WINDOW consecutive step losses so far, raises
LossDivergedError. A checkpoint is written as ``checkpoint.safetensors.pending`` (never
with NaN / inf parameters) and becomes ``checkpoint.safetensors`` once the next step's
loss, computed on exactly those parameters, passes both checks (or when fit returns or is
interrupted), so a stop always leaves the last checkpoint whose parameters gave a sane
loss; the message names it and the flags to continue with. Ctrl-C prints the checkpoint
and the ``--resume`` command, then re-raises KeyboardInterrupt. Temporary files a killed
run left in output_dir are removed when fit starts.
"""

from __future__ import annotations

import copy
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from ..compile_regions import set_compile
from .._tensor import as_tensor
from ..checkpoint import atomic_write_text, remove_stale_temp_files, save_checkpoint
from ..data import Datasets
from ..distributed import DistInfo, all_reduce_sum
from ..nn.lr_layers import lr_layers
from ..quant.activation import sign_quant_modules
from ..train_config import TrainConfig
from ._util import seed_everything
from .checkpointing import CheckpointingMixin
from .evaluation import evaluate, fixed_batches
from .guards import GuardsMixin
from .losses import classification_loss, distillation_loss, regularization
from .optim import build_optimizer, build_scheduler, current_lrs, make_schedule
from .plots import write_history
from .selection import deploy, select_network
from .state import (FINAL_CHECKPOINT, LAST_CHECKPOINT, LOSS_WINDOW, LossDivergedError,
                    NonFiniteLossError, TrainingState)

__all__ = ["Trainer", "NonFiniteLossError", "LossDivergedError", "LAST_CHECKPOINT",
           "FINAL_CHECKPOINT", "LOSS_WINDOW"]

class Trainer(CheckpointingMixin, GuardsMixin):
    """Fine-tunes `model` (an LR model, or any other quantized or float model) with `config`
    on `data`.

    Args:
        model: the converted model (moved to `info.device`; wrapped in DDP when distributed).
        config: TrainConfig.
        data: Datasets (train / val / test).
        teacher: the FP model before conversion (KD when config.kd_weight > 0, and the FP
            accuracy in the report).
        output_dir: where checkpoints, history.csv/json, curves.png and metrics.json go
            (rank 0 only); None writes nothing.
        meta: JSON-able facts stored in every checkpoint (model name, recipe, ...).
        info: distributed context (lr_quant.distributed.init_distributed()).
        log: per-epoch line printer; progress: tqdm bars.
        mixer: a batch mixer (x, y) -> (x, soft targets), e.g. lr_quant.data.batch_mixer's
            timm Mixup; the teacher sees the mixed batch too.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, data: Datasets,
                 teacher: Optional[nn.Module] = None, output_dir=None,
                 meta: Optional[Dict[str, Any]] = None, info: DistInfo = DistInfo(),
                 log: Callable[[str], None] = print, progress: bool = True,
                 num_workers: int = 0, mixer: Optional[Callable] = None):
        self.config = config
        self.mixer = mixer
        self.data = data
        self.info = info
        self.log = log if info.is_main else (lambda *_: None)
        self.progress = progress and info.is_main
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.meta = dict(meta or {})
        self.num_workers = num_workers
        self.model = model.to(info.device)
        self.teacher = teacher.to(info.device).eval() if teacher is not None else None
        if self.teacher is not None:
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        if config.batch_size % info.world_size:
            raise ValueError(f"train.batch_size={config.batch_size} must be divisible by the "
                             f"number of processes ({info.world_size})")
        if mixer is not None and (config.batch_size // info.world_size) % 2:
            raise ValueError(f"mixup / cutmix pair the samples of a batch: train.batch_size per "
                             f"process must be even, got {config.batch_size // info.world_size}")
        self.steps_per_epoch = len(data.train) // config.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"the training split has {len(data.train)} samples, fewer than "
                             f"one batch of {config.batch_size}")
        self.total_steps = config.epochs * self.steps_per_epoch
        self.state = TrainingState()
        self._pending_step: Optional[int] = None   # global step of the pending checkpoint
        self._good_step: Optional[int] = None      # ... of checkpoint.safetensors, if known
        seed_everything(config.seed + info.rank)   # independent LR / sign noise per rank
        self.ddp = None   # the DDP wrapper, built when training starts
        self._build_optimizer()
        self.temperature = make_schedule(config.sign_temperature, self.total_steps)
        self.noise_std = make_schedule(config.sign_noise_std, self.total_steps)
        self.sharpness = make_schedule(config.sharpness, self.total_steps)
        self.has_lr_layers = bool(lr_layers(self.model))

    def _build_optimizer(self) -> None:
        self.optimizer = build_optimizer(self.model, self.config)
        self.scheduler = build_scheduler(self.optimizer, self.config, self.steps_per_epoch)
        self._step_lrs: Optional[Dict[str, float]] = None   # rates of the last step (history)

    def _step_scheduler(self, steps_done: int) -> None:
        """After an optimizer step: note the rates it used, set the next step's (timm's
        per-update schedules; plateau steps per epoch, in _end_epoch)."""
        self._step_lrs = current_lrs(self.optimizer)
        self.scheduler.step_update(steps_done)

    def _wrap(self) -> nn.Module:
        if self.ddp is None:
            self.ddp = self.model
            if self.info.distributed:
                self.ddp = nn.parallel.DistributedDataParallel(
                    self.model,
                    device_ids=[self.info.local_rank] if self.info.device.type == "cuda" else None)
        return self.ddp

    # -- one epoch ---------------------------------------------------------------------------
    def _epoch_batches(self, epoch: int) -> List[List[int]]:
        """This rank's index lists for every global batch of `epoch`."""
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.data.train), generator=g).tolist()
        b, r, w = self.config.batch_size, self.info.rank, self.info.world_size
        return [order[k * b:(k + 1) * b][r::w] for k in range(self.steps_per_epoch)]

    def _set_schedules(self, step: int) -> None:
        """Sign temperature and noise, and the LR sharpness g, at `step`."""
        tau, sigma = self.temperature(step), self.noise_std(step)
        for m in sign_quant_modules(self.model):
            m.set_temperature(tau)
            if not isinstance(m.noise_std, nn.Parameter):   # a learned sigma_a is trained
                m.set_noise_std(sigma)
        sharpness = self.sharpness(step)
        for _, layer in lr_layers(self.model):
            layer.lr_sharpness = sharpness

    def _loss(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """(loss, logits) of a batch; `y`: class indices or soft targets (mixed batches)."""
        cfg = self.config
        amp = (torch.autocast(self.info.device.type, dtype=torch.bfloat16) if cfg.amp
               else nullcontext())
        with amp:
            out = as_tensor(self.ddp(x)).float()
            loss = classification_loss(out, y, cfg.label_smoothing)
            if cfg.kd_weight > 0 and self.teacher is not None:
                with torch.no_grad():
                    target = as_tensor(self.teacher(x)).float()
                loss = (1 - cfg.kd_weight) * loss + cfg.kd_weight * distillation_loss(
                    out, target, cfg.kd_temperature)
            reg = regularization(self.model, cfg.beta_regularizer, cfg.logit_decay)
            if reg is not None:
                loss = loss + reg
        return loss, out

    def _train_epoch(self, stop_after_steps: Optional[int]) -> bool:
        """Run the rest of the current epoch; False if stopped early by stop_after_steps."""
        from tqdm.auto import tqdm

        cfg, s = self.config, self.state
        batches = self._epoch_batches(s.epoch)[s.step_in_epoch:]
        loader = DataLoader(self.data.train, batch_sampler=batches, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(cfg.seed + s.epoch))
        self.ddp.train()
        bar = tqdm(total=self.steps_per_epoch, initial=s.step_in_epoch, disable=not self.progress,
                   desc=f"epoch {s.epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
        for x, y in loader:
            x, y = x.to(self.info.device), y.to(self.info.device)
            if self.mixer is not None:
                x, y = self.mixer(x, y)   # soft targets; accuracy below: the dominant class
            self._set_schedules(s.global_step)
            loss, out = self._loss(x, y)
            self._check_loss(loss)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self._step_scheduler(s.global_step + 1)
            if cfg.logit_clamp:
                for _, layer in lr_layers(self.model):
                    layer.clamp_logits_(cfg.logit_clamp)
            s.running[0] += loss.item() * len(y)
            s.running[1] += (out.argmax(1) == (y if y.ndim == 1 else y.argmax(1))).sum().item()
            s.running[2] += len(y)
            s.step_in_epoch += 1
            s.global_step += 1
            bar.update(1)
            if s.global_step % max(1, cfg.log_every) == 0 or s.step_in_epoch == 1:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if cfg.checkpoint_every and s.global_step % cfg.checkpoint_every == 0:
                self.save()
            if stop_after_steps is not None and s.global_step >= stop_after_steps:
                bar.close()
                return False
        bar.close()
        return True

    def _end_epoch(self) -> Dict[str, float]:
        s, cfg = self.state, self.config
        loss_sum, correct, count = all_reduce_sum(s.running, self.info.device)
        val = self._validate()
        # per-epoch schedules (plateau: on the validation accuracy); the others step per update
        metric = val["accuracy"] if math.isfinite(val["accuracy"]) else None
        self.scheduler.step(s.epoch + 1, metric)
        row = {"epoch": s.epoch + 1, "step": s.global_step,
               # the rates of the epoch's last step (none in this process: the current)
               **(self._step_lrs or current_lrs(self.optimizer)),
               "train_loss": loss_sum / max(count, 1), "train_accuracy": correct / max(count, 1),
               "val_loss": val["loss"], "val_accuracy": val["accuracy"],
               "seconds": time.time() - s.epoch_start_time}
        s.history.append(row)
        rates = f"lr {row['lr']:.3g}" + (f" logits {row['logits_lr']:.3g}"
                                         if math.isfinite(row["logits_lr"]) else "")
        self.log(f"epoch {row['epoch']:3d}/{cfg.epochs}  step {row['step']:6d}  {rates}  "
                 f"train loss {row['train_loss']:.4f} "
                 f"acc {row['train_accuracy']:.3f}  val{' (frozen)' if cfg.val_frozen and self.has_lr_layers else ''} "
                 f"loss {row['val_loss']:.4f} acc {row['val_accuracy']:.3f}  ({row['seconds']:.1f} s)")
        s.epoch += 1
        s.step_in_epoch = 0
        s.running = [0.0, 0.0, 0.0]
        s.epoch_start_time = time.time()
        self.write_logs()
        return row

    def _validate(self) -> Dict[str, float]:
        """Validation loss / accuracy of the network training would deploy now: a frozen
        copy (mode weights, BatchNorm re-estimated) with `val_frozen`, else the LR model in
        eval() (mode weights with the BatchNorm statistics of stochastic training passes)."""
        cfg = self.config
        if not len(self.data.val):
            return {"loss": float("nan"), "accuracy": float("nan")}
        model = self.model
        if self.has_lr_layers and cfg.val_frozen:
            model = deploy(copy.deepcopy(self.model), self._bn_batches())
        return evaluate(model, self.data.val, cfg.eval_batch_size, self.info)

    def fit(self, resume=None, stop_after_steps: Optional[int] = None) -> List[Dict[str, float]]:
        """Train to config.epochs (from a checkpoint with `resume`); returns the history.

        stop_after_steps: stop (with a checkpoint) once that many optimizer steps are done
        in total, as an interruption would; `fit(resume=...)` continues."""
        if resume is not None:
            self.resume(resume)
        self._wrap()
        self.state.epoch_start_time = time.time()
        if self.output_dir and self.info.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            removed = remove_stale_temp_files(self.output_dir)
            if removed:
                self.log(f"removed temporary files an interrupted run left in "
                         f"{self.output_dir}: {', '.join(removed)}")
        flush = self.config.flush_denormal and self.info.device.type == "cpu" and \
            torch.set_flush_denormal(True)   # False where the CPU does not support it
        if self.config.compile:
            set_compile(self.model, True)
        try:
            with self._interrupt_hint():
                while self.state.epoch < self.config.epochs:
                    finished = self._train_epoch(stop_after_steps)
                    if finished:
                        self._end_epoch()
                    self.save()   # every epoch end, and where an interruption stopped
                    if not finished:
                        break
                self._commit()   # the last state: its parameters are finite (save checks)
            if self.state.epoch < self.config.epochs:
                self.log(f"stopped after {self.state.global_step} steps; resume with the "
                         f"checkpoint {self.checkpoint_path}")
        finally:
            if flush:
                torch.set_flush_denormal(False)
            if self.config.compile:
                set_compile(self.model, False)
            # Release the DDP wrapper (rebuilt by the next fit): its reducer holds the
            # process group, which must be destroyed while the interpreter is alive, not
            # at exit (gloo aborted a rank in teardown: "terminate called without an
            # active exception").
            self.ddp = None
        return self.state.history

    # -- after training ----------------------------------------------------------------------
    def _bn_batches(self) -> List[Tensor]:
        """The fixed training batches (no augmentation) BatchNorm is re-estimated on."""
        if getattr(self, "_bn_cache", None) is not None:
            return self._bn_cache
        cfg = self.config
        batches = fixed_batches(self.data.train_eval or self.data.train, cfg.batch_size,
                                cfg.bn_reestimate_batches, cfg.seed + 4242, self.info.device)
        if sum(b.numel() for b in batches) * 4 < 2**28:   # keep small ones (< 256 MB)
            self._bn_cache = batches
        return batches

    def finalize(self, baseline: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Build the deployed network and measure it (lr_quant.train.selection); returns
        the accuracies. LR models: freeze, re-estimate BatchNorm, pick among sampled
        networks; models without LR layers: re-estimate BatchNorm on the trained network.
        The model is left as the selected network in eval(); rank 0 writes
        final.safetensors and metrics.json to output_dir. `baseline`: metrics measured
        before training (fp_*, converted_*) to include in the report."""
        with self._interrupt_hint():
            metrics = select_network(self.model, self.data, self.config, self._bn_batches(),
                                     self.info, baseline, self.log)
            if self.output_dir and self.info.is_main:
                save_checkpoint(self.output_dir / FINAL_CHECKPOINT, self.model,
                                {**self._meta(), "frozen": True, "metrics": metrics})
                atomic_write_text(self.output_dir / "metrics.json",
                                  json.dumps(metrics, indent=2))
        return metrics

    # -- logs --------------------------------------------------------------------------------
    def write_logs(self) -> None:
        """history.csv, history.json and curves.png in output_dir (rank 0)."""
        if not self.output_dir or not self.info.is_main or not self.state.history:
            return
        write_history(self.state.history, self.output_dir,
                      "train (LR sample)" if self.has_lr_layers else "train")
