"""Fine-tune a converted LR model from its pretrained full-precision weights.

    trainer = Trainer(lr_model, TrainConfig(...), datasets, teacher=fp_model, output_dir="run")
    trainer.fit()                 # epochs of LR training, checkpoints, logs, curves
    metrics = trainer.finalize()  # freeze -> BN re-estimation -> (sampled networks) -> accuracies

Loss per step (mean over the global batch):
    (1 - kd_weight) * CE(student, y) + kd_weight * T^2 * KL(softmax(teacher/T) || softmax(student/T))
    + beta_regularizer * sum_binary_layers sum p(1-p)          (Shayer's beta term)
    + logit_decay      * sum_ternary/categorical_layers ||logits||^2
the student forward is the LR forward (local reparameterization sample) in train(); the
teacher is the FP model before conversion (a deep copy, eval mode, no gradient).

Optimizer groups: LR logits (lr_logits, no weight decay) and real-valued parameters
(lr_params; weight decay on tensors with ndim > 1 only, not on BN / biases / thresholds).
The learning rate is stepped per optimizer step: linear warmup over `warmup_epochs`, then
cosine to 0, constant, or x0.1 at 50% and 75% ("step"). Sign temperature / noise follow
`ParamSchedule`s over all steps. Logits are clamped to +-logit_clamp after every step.
On CPU, subnormal floats are flushed to zero while fitting (``flush_denormal``).

Accuracies reported by `finalize` (validation split carved from train; test split):
    fp_*          the FP teacher (before conversion)
    converted_*   the LR model right after conversion (eval(): mode weights)
    lr_mode_*     the trained LR model in eval() before freezing: mode weights with the
                  BatchNorm statistics gathered on stochastic LR training passes
    frozen_*      freeze(model, "mode") + BatchNorm statistics re-estimated on the frozen
                  network from training batches — the deployed network
    sampled_*     with sampled_networks = K > 0: the best of K sampled networks
                  freeze(model, "sample", seed=k) (each with re-estimated BN), chosen on
                  the validation split; kept as the final network only if it beats the mode
                  on validation. The test split never takes part in a choice.

Data order: epoch e visits a permutation drawn from a generator seeded with (seed, e), in
global batches of `batch_size` (last partial batch dropped); under DDP rank r takes every
world_size-th sample of each global batch. Resuming re-creates the permutation and skips
the batches already done, and restores the torch / numpy / python RNG states (per rank),
so a resumed CPU run reproduces the uninterrupted one bit for bit.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from .checkpoint import (CheckpointError, atomic_write_text, capture_rng_state, load_checkpoint,
                         load_model_state, restore_rng_state, save_checkpoint)
from .data import Datasets
from .distributed import DistInfo, all_reduce_sum
from .freeze import freeze
from .nn.lr_layers import lr_layers
from .quant.activation import ParamSchedule, sign_quant_modules
from .train_config import ScheduleConfig, TrainConfig

__all__ = ["Trainer", "NonFiniteLossError", "param_groups", "build_optimizer",
           "lr_lambda", "regularization", "distillation_loss", "reestimate_batchnorm",
           "evaluate", "seed_everything", "LAST_CHECKPOINT", "FINAL_CHECKPOINT"]

LAST_CHECKPOINT = "checkpoint.safetensors"
FINAL_CHECKPOINT = "final.safetensors"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped (the last checkpoint is kept)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# -- optimization pieces ---------------------------------------------------------------------
def param_groups(model: nn.Module, config: TrainConfig) -> List[Dict[str, Any]]:
    """[LR logits (no decay), real params with decay (ndim > 1), real params without decay]."""
    logits, decay, no_decay = [], [], []
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("weight_logits"):
            logits.append(p)
        elif p.ndim > 1:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        dict(params=logits, lr=config.lr_logits, weight_decay=0.0, name="lr_logits"),
        dict(params=decay, lr=config.lr_params, weight_decay=config.weight_decay, name="params"),
        dict(params=no_decay, lr=config.lr_params, weight_decay=0.0, name="params_no_decay"),
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, config)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if config.optimizer == "adam":
        return torch.optim.Adam(groups)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups)
    return torch.optim.SGD(groups, momentum=config.momentum, nesterov=config.momentum > 0)


def lr_lambda(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base learning rates at optimizer step `step` (0-based)."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(total, config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        r = (step - warmup) / max(1, total - warmup)
        if config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, r)))
        if config.schedule == "step":
            return 0.1 ** ((r >= 0.5) + (r >= 0.75))
        return 1.0

    return factor


def make_schedule(config: ScheduleConfig, total_steps: int) -> ParamSchedule:
    return ParamSchedule(config.start, config.end, max(1, total_steps), config.kind)


def regularization(model: nn.Module, beta: float, logit_decay: float) -> Tensor:
    """beta * sum p(1-p) over binary LR layers + logit_decay * ||logits||^2 over the others."""
    total = None
    for _, layer in lr_layers(unwrap(model)):
        weight = beta if layer.lr_distribution.name == "binary" else logit_decay
        if weight:
            term = weight * layer.lr_regularizer()
            total = term if total is None else total + term
    return total


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Hinton KD: T^2 * KL(softmax(teacher/T) || softmax(student/T)), mean over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, dim=1), F.log_softmax(teacher.float() / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


def _value(x):
    return getattr(x, "value", x)


# -- evaluation ------------------------------------------------------------------------------
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
            out = _value(model(x)).float()
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


# -- the trainer -----------------------------------------------------------------------------
@dataclass
class _State:
    epoch: int = 0            # current epoch (0-based)
    step_in_epoch: int = 0    # optimizer steps done in the current epoch
    global_step: int = 0
    history: List[Dict[str, float]] = field(default_factory=list)
    # running sums of the current epoch (loss_sum, correct, count), for resume
    running: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    epoch_start_time: float = 0.0


class Trainer:
    """Fine-tunes `model` (an LR model, or any float model) with `config` on `data`.

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
    """

    def __init__(self, model: nn.Module, config: TrainConfig, data: Datasets,
                 teacher: Optional[nn.Module] = None, output_dir=None,
                 meta: Optional[Dict[str, Any]] = None, info: DistInfo = DistInfo(),
                 log: Callable[[str], None] = print, progress: bool = True,
                 num_workers: int = 0):
        self.config = config
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
        self.steps_per_epoch = len(data.train) // config.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"the training split has {len(data.train)} samples, fewer than "
                             f"one batch of {config.batch_size}")
        self.total_steps = config.epochs * self.steps_per_epoch
        self.state = _State()
        seed_everything(config.seed + info.rank)   # independent LR / sign noise per rank
        self.ddp = None   # the DDP wrapper, built when training starts
        self._build_optimizer()
        self.temperature = make_schedule(config.sign_temperature, self.total_steps)
        self.noise_std = make_schedule(config.sign_noise_std, self.total_steps)
        self.has_lr_layers = bool(lr_layers(self.model))

    def _build_optimizer(self) -> None:
        self.optimizer = build_optimizer(self.model, self.config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.config, self.steps_per_epoch))

    def _wrap(self) -> nn.Module:
        if self.ddp is None:
            self.ddp = self.model
            if self.info.distributed:
                self.ddp = nn.parallel.DistributedDataParallel(
                    self.model,
                    device_ids=[self.info.local_rank] if self.info.device.type == "cuda" else None)
        return self.ddp

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Optional[Path]:
        return self.output_dir / LAST_CHECKPOINT if self.output_dir else None

    def _training_state(self) -> Dict[str, Any]:
        rng = capture_rng_state()
        if self.info.distributed:
            gathered = [None] * self.info.world_size
            dist.all_gather_object(gathered, rng)
            rng_per_rank = gathered
        else:
            rng_per_rank = [rng]
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng_per_rank": rng_per_rank}

    def _meta(self, **extra) -> Dict[str, Any]:
        s = self.state
        return {**self.meta, "epoch": s.epoch, "step_in_epoch": s.step_in_epoch,
                "global_step": s.global_step, "history": s.history, "running": s.running,
                "world_size": self.info.world_size, "train": asdict(self.config), **extra}

    def save(self, path: Optional[Path] = None, **extra) -> Optional[Path]:
        """Checkpoint the training state (rank 0 writes; all ranks must call it)."""
        state = self._training_state()   # collective under DDP
        with torch.no_grad():   # store the current mode as the materialized weight
            for _, layer in lr_layers(self.model):
                if not layer.is_lr_frozen:
                    layer.materialize_weight()
        path = path or self.checkpoint_path
        if path is None or not self.info.is_main:
            return path
        return save_checkpoint(path, self.model, self._meta(**extra), state)

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
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: optimizer state does not fit ({e})") from e
        self.state = _State(epoch=meta["epoch"], step_in_epoch=meta["step_in_epoch"],
                            global_step=meta["global_step"], history=meta["history"],
                            running=meta.get("running", [0.0, 0.0, 0.0]),
                            epoch_start_time=time.time())
        rngs = state["rng_per_rank"]
        if len(rngs) == self.info.world_size:
            restore_rng_state(rngs[self.info.rank])
        else:   # another number of processes: fresh, distinct noise per rank
            seed_everything(self.config.seed + self.info.rank + 7919 * self.state.global_step)
        self.log(f"resumed from {path} at epoch {self.state.epoch + 1}, step "
                 f"{self.state.global_step}/{self.total_steps}")

    # -- one epoch ---------------------------------------------------------------------------
    def _epoch_batches(self, epoch: int) -> List[List[int]]:
        """This rank's index lists for every global batch of `epoch`."""
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.data.train), generator=g).tolist()
        b, r, w = self.config.batch_size, self.info.rank, self.info.world_size
        return [order[k * b:(k + 1) * b][r::w] for k in range(self.steps_per_epoch)]

    def _set_sign_schedules(self, step: int) -> None:
        tau, sigma = self.temperature(step), self.noise_std(step)
        for m in sign_quant_modules(self.model):
            m.set_temperature(tau)
            if not isinstance(m.noise_std, nn.Parameter):   # a learned sigma_a is trained
                m.set_noise_std(sigma)

    def _loss(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        cfg = self.config
        amp = (torch.autocast(self.info.device.type, dtype=torch.bfloat16) if cfg.amp
               else nullcontext())
        with amp:
            out = _value(self.ddp(x)).float()
            loss = F.cross_entropy(out, y)
            if cfg.kd_weight > 0 and self.teacher is not None:
                with torch.no_grad():
                    target = _value(self.teacher(x)).float()
                loss = (1 - cfg.kd_weight) * loss + cfg.kd_weight * distillation_loss(
                    out, target, cfg.kd_temperature)
            reg = regularization(self.model, cfg.beta_regularizer, cfg.logit_decay)
            if reg is not None:
                loss = loss + reg
        return loss, out

    def _check_finite(self, loss: Tensor) -> None:
        bad = 0.0 if torch.isfinite(loss).item() else 1.0
        if self.info.distributed:
            bad = all_reduce_sum([bad], self.info.device)[0]
        if bad:
            where = (f"epoch {self.state.epoch + 1}, step {self.state.global_step + 1}")
            kept = (f"the last good checkpoint is {self.checkpoint_path}"
                    if self.checkpoint_path and self.checkpoint_path.exists()
                    else "no checkpoint was written yet")
            raise NonFiniteLossError(
                f"loss is {loss.item()} at {where}; training stopped ({kept}). Lower "
                f"train.lr_logits / train.lr_params, set train.grad_clip, or check the data.")

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
            self._set_sign_schedules(s.global_step)
            loss, out = self._loss(x, y)
            self._check_finite(loss)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            if cfg.logit_clamp:
                for _, layer in lr_layers(self.model):
                    layer.clamp_logits_(cfg.logit_clamp)
            s.running[0] += loss.item() * len(y)
            s.running[1] += (out.argmax(1) == y).sum().item()
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
        row = {"epoch": s.epoch + 1, "step": s.global_step,
               "lr_factor": self.scheduler.lr_lambdas[0](max(0, s.global_step - 1)),
               "train_loss": loss_sum / max(count, 1), "train_accuracy": correct / max(count, 1),
               "val_loss": val["loss"], "val_accuracy": val["accuracy"],
               "seconds": time.time() - s.epoch_start_time}
        s.history.append(row)
        self.log(f"epoch {row['epoch']:3d}/{cfg.epochs}  step {row['step']:6d}  "
                 f"lr x{row['lr_factor']:.3f}  train loss {row['train_loss']:.4f} "
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
            model = copy.deepcopy(self.model)
            freeze(model, "mode")
            reestimate_batchnorm(model, self._bn_batches())
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
        flush = self.config.flush_denormal and self.info.device.type == "cpu" and \
            torch.set_flush_denormal(True)   # False where the CPU does not support it
        try:
            while self.state.epoch < self.config.epochs:
                finished = self._train_epoch(stop_after_steps)
                if finished:
                    self._end_epoch()
                self.save()   # every epoch end, and where an interruption stopped
                if not finished:
                    self.log(f"stopped after {self.state.global_step} steps; resume with the "
                             f"checkpoint {self.checkpoint_path}")
                    break
        finally:
            if flush:
                torch.set_flush_denormal(False)
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
        dataset = self.data.train_eval or self.data.train
        g = torch.Generator().manual_seed(cfg.seed + 4242)
        order = torch.randperm(len(dataset), generator=g).tolist()
        b = cfg.batch_size
        n = min(cfg.bn_reestimate_batches, len(order) // b)
        if n == 0 and cfg.bn_reestimate_batches and len(order) >= 2:
            b, n = len(order), 1
        batches = []
        for k in range(n):
            items = [dataset[i] for i in order[k * b:(k + 1) * b]]
            batches.append(torch.stack([torch.as_tensor(x) for x, _ in items]).to(self.info.device))
        if sum(b.numel() for b in batches) * 4 < 2**28:   # keep small ones (< 256 MB)
            self._bn_cache = batches
        return batches

    def _accuracies(self, prefix: str, metrics: Dict[str, float], test: bool = True) -> None:
        cfg = self.config
        if len(self.data.val):
            metrics[f"{prefix}_val_accuracy"] = evaluate(self.model, self.data.val,
                                                         cfg.eval_batch_size, self.info)["accuracy"]
        if test:
            metrics[f"{prefix}_test_accuracy"] = evaluate(self.model, self.data.test,
                                                          cfg.eval_batch_size, self.info)["accuracy"]

    def finalize(self, baseline: Optional[Dict[str, float]] = None) -> Dict[str, float]:
        """Freeze, re-estimate BatchNorm, pick among sampled networks; returns accuracies.

        The model is left frozen (the selected network) in eval(); rank 0 writes
        final.safetensors and metrics.json to output_dir. `baseline`: metrics measured
        before training (fp_*, converted_*) to include in the report."""
        cfg = self.config
        metrics: Dict[str, float] = dict(baseline or {})
        if not self.has_lr_layers:
            raise ValueError("finalize needs a model with LR layers (nothing to freeze)")
        self._accuracies("lr_mode", metrics)
        bn_batches = self._bn_batches()
        freeze(self.model, "mode")
        reestimate_batchnorm(self.model, bn_batches)
        self._accuracies("frozen", metrics)
        selected = "mode"
        if cfg.sampled_networks > 0 and len(self.data.val):
            best_seed, best_val = None, metrics["frozen_val_accuracy"]
            sample_vals = []
            for k in range(cfg.sampled_networks):
                freeze(self.model, "sample", seed=cfg.seed + k)
                reestimate_batchnorm(self.model, bn_batches)
                val = evaluate(self.model, self.data.val, cfg.eval_batch_size, self.info)["accuracy"]
                sample_vals.append(val)
                if best_seed is None or val > sample_vals[best_seed - cfg.seed]:
                    best_seed = cfg.seed + k
            metrics["sampled_mean_val_accuracy"] = float(np.mean(sample_vals))
            metrics["sampled_best_val_accuracy"] = max(sample_vals)
            metrics["sampled_best_seed"] = best_seed
            freeze(self.model, "sample", seed=best_seed)
            reestimate_batchnorm(self.model, bn_batches)
            metrics["sampled_best_test_accuracy"] = evaluate(
                self.model, self.data.test, cfg.eval_batch_size, self.info)["accuracy"]
            if max(sample_vals) > best_val:
                selected = f"sample seed {best_seed}"
            else:
                freeze(self.model, "mode")
                reestimate_batchnorm(self.model, bn_batches)
        metrics["selected_network"] = selected
        metrics["final_test_accuracy"] = (metrics["sampled_best_test_accuracy"]
                                          if selected != "mode" else metrics["frozen_test_accuracy"])
        self.model.eval()
        if self.output_dir and self.info.is_main:
            save_checkpoint(self.output_dir / FINAL_CHECKPOINT, self.model,
                            {**self._meta(), "frozen": True, "metrics": metrics})
            atomic_write_text(self.output_dir / "metrics.json", json.dumps(metrics, indent=2))
        return metrics

    # -- logs --------------------------------------------------------------------------------
    def write_logs(self) -> None:
        """history.csv, history.json and curves.png in output_dir (rank 0)."""
        if not self.output_dir or not self.info.is_main or not self.state.history:
            return
        history = self.state.history
        atomic_write_text(self.output_dir / "history.json", json.dumps(history, indent=2))
        tmp = self.output_dir / "history.csv.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
        tmp.replace(self.output_dir / "history.csv")
        plot_history(history, self.output_dir / "curves.png")


def plot_history(history: List[Dict[str, float]], path) -> Optional[Path]:
    """Loss and accuracy curves (train vs validation) per epoch, as a PNG (matplotlib Agg)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:   # matplotlib is a dev extra: the logs are still written
        return None
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train (LR sample)")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "s-", label="val")
    ax_loss.set_xlabel("epoch"); ax_loss.set_ylabel("loss"); ax_loss.legend()
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train (LR sample)")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "s-", label="val")
    ax_acc.set_xlabel("epoch"); ax_acc.set_ylabel("accuracy"); ax_acc.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
    return path


# -- recipe-level entry points (what `lr-quant train / eval / export` call) ----------------
def _image_batch(dataset: Dataset, n: int, offset: int = 0) -> Tensor:
    n = min(n, len(dataset) - offset)
    return torch.stack([torch.as_tensor(dataset[offset + i][0]) for i in range(n)])


def build_float_model(recipe, num_classes: int, pretrained=None) -> nn.Module:
    """The recipe's timm model with its pretrained FP weights (model.checkpoint: a local
    file; model.pretrained: the hub). `pretrained=False` forces a random init."""
    from .models import ModelError, create_model

    m = recipe.model
    if not m.name:
        raise ModelError("the recipe names no model: set model.name (e.g. --model.name resnet10t)")
    if pretrained is None:
        pretrained = m.checkpoint or m.pretrained
    kwargs = dict(m.kwargs)
    if m.in_chans:
        kwargs["in_chans"] = m.in_chans
    return create_model(m.name, num_classes, pretrained=pretrained, **kwargs)


def _num_classes(recipe, data: Datasets) -> int:
    n = recipe.model.num_classes
    if n is not None and n != data.num_classes:
        raise ValueError(f"model.num_classes={n} but the data set {recipe.data.dataset!r} has "
                         f"{data.num_classes} classes")
    return data.num_classes


def run_training(recipe, output_dir, resume=None, log: Callable[[str], None] = print,
                 progress: bool = True, stop_after_steps: Optional[int] = None,
                 info: Optional[DistInfo] = None) -> Dict[str, Any]:
    """Fine-tune the recipe's model from its pretrained FP weights, end to end.

    data -> FP model (teacher) -> convert -> calibrate sign thresholds -> Trainer.fit ->
    Trainer.finalize. Writes recipe.yaml, checkpoint.safetensors, final.safetensors,
    history.csv/json, curves.png and metrics.json to `output_dir` (rank 0). `resume`: a
    checkpoint path, or "auto" for output_dir/checkpoint.safetensors if it exists.
    Returns the metrics (empty if stopped early by `stop_after_steps`).
    """
    from .convert import calibrate_thresholds, convert_with_report
    from .distributed import init_distributed
    from .models import architecture_of

    info = info or init_distributed()
    out = Path(output_dir)
    cfg = recipe.train
    if resume == "auto":
        resume = out / LAST_CHECKPOINT if (out / LAST_CHECKPOINT).exists() else None
    seed_everything(cfg.seed)
    data = build_datasets_for(recipe)
    num_classes = _num_classes(recipe, data)
    fp_model = build_float_model(recipe, num_classes)
    teacher = copy.deepcopy(fp_model).eval()
    lr_model, report = convert_with_report(fp_model, recipe)
    if info.is_main:
        log(str(report))
    calibrate_thresholds(lr_model, _image_batch(data.train, 64))
    baseline = {}
    if resume is None:
        baseline = {"fp_test_accuracy": evaluate(teacher, data.test, cfg.eval_batch_size,
                                                 info)["accuracy"],
                    "converted_test_accuracy": evaluate(lr_model, data.test, cfg.eval_batch_size,
                                                        info)["accuracy"]}
        log(f"FP {recipe.model.name} test accuracy {baseline['fp_test_accuracy']:.3f}; LR at "
            f"conversion (mode) {baseline['converted_test_accuracy']:.3f}")
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "recipe.yaml", recipe.to_yaml())
    meta = {"model": recipe.model.name, "num_classes": num_classes,
            "architecture": architecture_of(teacher), "recipe": recipe.to_dict(),
            "baseline": baseline}
    trainer = Trainer(lr_model, cfg, data, teacher=teacher, output_dir=out, meta=meta, info=info,
                      log=log, progress=progress, num_workers=recipe.data.num_workers)
    if resume is not None:
        trainer.resume(resume)
        baseline = trainer.resumed_meta.get("baseline") or baseline
    trainer.fit(stop_after_steps=stop_after_steps)
    if trainer.state.epoch < cfg.epochs:
        return {}
    metrics = trainer.finalize(baseline)
    log(format_metrics(metrics))
    return metrics


def build_datasets_for(recipe) -> Datasets:
    from .data import build_datasets
    return build_datasets(recipe.data, recipe.train.val_fraction, recipe.train.seed)


def format_metrics(metrics: Dict[str, Any]) -> str:
    names = [("fp_test_accuracy", "full precision (teacher)"),
             ("converted_test_accuracy", "LR at conversion (mode)"),
             ("lr_mode_test_accuracy", "LR trained, mode, training BN stats"),
             ("frozen_test_accuracy", "frozen (mode), BN re-estimated"),
             ("sampled_best_test_accuracy", "best sampled network (chosen on val)")]
    lines = ["test accuracy:"]
    for key, label in names:
        if key in metrics:
            val = metrics.get(key.replace("test", "val"))
            lines.append(f"  {label:40s} {metrics[key]:.4f}"
                         + (f"   (val {val:.4f})" if isinstance(val, float) else ""))
    if "selected_network" in metrics:
        lines.append(f"  kept network: {metrics['selected_network']}")
    return "\n".join(lines)


def load_trained_model(path) -> Tuple[nn.Module, Any, Dict[str, Any]]:
    """(model, recipe, meta) from a checkpoint written by training (frozen or not)."""
    from .convert import convert
    from .recipe import Recipe

    model_state, meta, _ = load_checkpoint(path)
    if "recipe" not in meta or not isinstance(meta["recipe"], dict):
        raise CheckpointError(f"{path} does not record its recipe; it was not written by "
                              f"lr-quant train")
    recipe = Recipe.from_dict(meta["recipe"])
    model = build_float_model(recipe, meta["num_classes"], pretrained=False)
    model = convert(model, recipe)
    load_model_state(model, model_state, source=str(path))
    model.eval()
    return model, recipe, meta
