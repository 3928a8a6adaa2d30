"""The fine-tuning loop: `Trainer`.

    trainer = Trainer(lr_model, TrainConfig(...), datasets, teacher=fp_model, output_dir="run")
    trainer.fit()                 # epochs of training, checkpoints, logs, curves
    metrics = trainer.finalize()  # deployed network (frozen, BN re-estimated) + accuracies

Each step minimizes the loss of lr_quant.train.losses (CE, KD from the teacher, LR
regularizers) with the optimizer and per-step schedules of lr_quant.train.optim; logits
are clamped to +-logit_clamp after every step. On CPU, subnormal floats are flushed to
zero while fitting (``flush_denormal``).

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
import shlex
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from .._tensor import as_tensor
from ..checkpoint import (CheckpointError, atomic_write_text, capture_rng_state, load_checkpoint,
                          load_model_state, remove_stale_temp_files, restore_rng_state,
                          save_checkpoint)
from ..data import Datasets
from ..distributed import DistInfo, all_reduce_sum
from ..nn.lr_layers import lr_layers
from ..quant.activation import sign_quant_modules
from ..train_config import TrainConfig
from ._util import seed_everything
from .evaluation import evaluate, fixed_batches
from .losses import distillation_loss, regularization
from .optim import build_optimizer, lr_lambda, make_schedule
from .plots import write_history
from .selection import deploy, select_network

__all__ = ["Trainer", "NonFiniteLossError", "LossDivergedError", "LAST_CHECKPOINT",
           "FINAL_CHECKPOINT", "LOSS_WINDOW"]

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
class _State:
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


class Trainer:
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
                "scheduler": self.scheduler.state_dict(),
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
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: optimizer state does not fit ({e})") from e
        self._apply_hyperparameters(configured)
        self.state = _State(epoch=meta["epoch"], step_in_epoch=meta["step_in_epoch"],
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

    def _apply_hyperparameters(self, configured: List[Dict[str, Any]]) -> None:
        """Replace the hyper-parameters a loaded optimizer state brought (its param groups:
        lr, weight_decay, momentum, ...) by this config's (`configured`: the groups of a
        freshly built optimizer), the learning rates at the restored schedule position.
        Unchanged config: the same values, so resume stays bit-exact."""
        sched = self.scheduler
        for group, new in zip(self.optimizer.param_groups, configured):
            group.update(new)
        sched.base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]
        lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs

    # -- guards ------------------------------------------------------------------------------
    def _any_rank(self, flag: bool) -> bool:
        if self.info.distributed:
            return bool(all_reduce_sum([float(flag)], self.info.device)[0])
        return flag

    def _check_parameters(self) -> None:
        """NonFiniteLossError if a parameter or buffer of the model is NaN / inf."""
        tensors = [t for t in [*self.model.parameters(), *self.model.buffers()]
                   if t.is_floating_point()]
        finite = bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) \
            if tensors else True
        if self._any_rank(not finite):
            self._stop(NonFiniteLossError, f"a parameter became NaN / inf after step "
                                           f"{self.state.global_step}")

    def _loss_limit(self) -> Optional[float]:
        """The loss above which training counts as diverged (None: no reference yet, or
        the check is off)."""
        factor, best = self.config.divergence_factor, self.state.loss_best
        if not factor or best is None:
            return None
        return factor * max(best, LOSS_FLOOR)

    def _check_loss(self, loss: Tensor) -> None:
        """Stop on a NaN / inf or runaway loss (all ranks agree). A sane loss confirms the
        pending checkpoint (the loss is that of its parameters) and updates the reference."""
        s, local = self.state, loss.item()
        bad, value = (0.0, local) if math.isfinite(local) else (1.0, 0.0)
        if self.info.distributed:   # the mean loss over ranks
            bad, value = all_reduce_sum([bad, value], self.info.device)
            value /= self.info.world_size
        where = f"at epoch {s.epoch + 1}, step {s.global_step + 1}"
        if bad:
            shown = local if not math.isfinite(local) else "non-finite on another rank"
            self._stop(NonFiniteLossError, f"loss is {shown} {where}")
        limit = self._loss_limit()
        if limit is not None and value > limit:
            self._stop(LossDivergedError,
                       f"loss {value:.4g} {where} ran away: above train.divergence_factor "
                       f"({self.config.divergence_factor:g}) x its reference level "
                       f"{max(s.loss_best, LOSS_FLOOR):.4g}")
        self._commit()
        s.loss_window = (s.loss_window + [value])[-LOSS_WINDOW:]
        median = statistics.median(s.loss_window)
        s.loss_best = median if s.loss_best is None else min(s.loss_best, median)

    def _stop(self, error: type, reason: str) -> None:
        """Drop the unconfirmed checkpoint and raise `error` with what is kept and how to go on."""
        self._drop_pending()
        cfg = self.config
        flags = (f"--train.lr_logits {cfg.lr_logits / 10:g} --train.lr_params "
                 f"{cfg.lr_params / 10:g}" + ("" if cfg.grad_clip else " --train.grad_clip 1"))
        if self._kept() is None:
            kept = "no good checkpoint was written"
            how = (f"start again with lower learning rates and gradient clipping, e.g. "
                   f"{self._command(flags, fresh=True)}" if self._recipe_file() else
                   f"start again with lower lr_logits / lr_params and grad_clip set")
        else:
            kept = f"the last good checkpoint is {self._kept()}"
            how = (f"continue from it with lower learning rates and gradient clipping, e.g. "
                   f"{self._command(flags)}" if self._recipe_file() else
                   f"continue from it (Trainer.fit(resume=...)) with lower lr_logits / "
                   f"lr_params and grad_clip set")
        raise error(f"{reason}; training stopped ({kept}). To go on, {how}; or check the data.")

    # -- messages ----------------------------------------------------------------------------
    def _kept(self) -> Optional[str]:
        """'<checkpoint.safetensors> (step s)', None if there is none."""
        path = self.checkpoint_path
        if path is None or not path.exists():
            return None
        return f"{path}" + (f" (step {self._good_step})" if self._good_step is not None else "")

    def _recipe_file(self) -> Optional[Path]:
        """output_dir/recipe.yaml when the run was started by lr-quant train / run_training."""
        path = self.output_dir / "recipe.yaml" if self.output_dir else None
        return path if path is not None and path.exists() else None

    def _command(self, flags: str = "", fresh: bool = False) -> str:
        """The `lr-quant train` command that continues this run (`fresh`: starts it again
        in a new folder) from its recorded recipe, with extra `flags`."""
        out = shlex.quote(str(self.output_dir))
        where = "--output NEW_FOLDER" if fresh else f"--output {out} --resume"
        return " ".join(filter(None, ["lr-quant train -c", shlex.quote(str(self._recipe_file())),
                                      where, flags]))

    def _interrupted(self) -> str:
        s = self.state
        where = (f"interrupted at epoch {s.epoch + 1}, step {s.global_step}"
                 if s.epoch < self.config.epochs else
                 "interrupted after training, while building the deployed network")
        if self._kept() is None:
            return f"{where}, before the first checkpoint: nothing to resume, start again"
        how = (f"continue with: {self._command()}" if self._recipe_file() else
               f"continue with Trainer.fit(resume={str(self.checkpoint_path)!r})")
        return f"{where}; the last checkpoint is {self._kept()}; {how}"

    @contextmanager
    def _interrupt_hint(self):
        """On Ctrl-C: keep the pending checkpoint, print where to resume, re-raise."""
        try:
            yield
        except KeyboardInterrupt:
            self._commit()
            self.log(self._interrupted())
            raise

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
        cfg = self.config
        amp = (torch.autocast(self.info.device.type, dtype=torch.bfloat16) if cfg.amp
               else nullcontext())
        with amp:
            out = as_tensor(self.ddp(x)).float()
            loss = F.cross_entropy(out, y)
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
            self._set_schedules(s.global_step)
            loss, out = self._loss(x, y)
            self._check_loss(loss)
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
