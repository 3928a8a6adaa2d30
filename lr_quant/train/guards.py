"""The Trainer's guards: NaN / inf and runaway-loss stops that keep the last sane
checkpoint, and the messages that say how to continue (also after Ctrl-C). See
lr_quant.train.trainer and docs/training.md."""

from __future__ import annotations

import math
import shlex
import statistics
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..distributed import all_reduce_sum
from .state import LOSS_FLOOR, LOSS_WINDOW, LossDivergedError, NonFiniteLossError

__all__ = ["GuardsMixin"]


class GuardsMixin:
    """Guard and message methods of :class:`lr_quant.train.trainer.Trainer`."""

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
        flags = (f"--train.logits_lr {cfg.logits_lr / 10:g} --train.params_lr "
                 f"{cfg.params_lr / 10:g}" + ("" if cfg.grad_clip else " --train.grad_clip 1"))
        if self._kept() is None:
            kept = "no good checkpoint was written"
            how = (f"start again with lower learning rates and gradient clipping, e.g. "
                   f"{self._command(flags, fresh=True)}" if self._recipe_file() else
                   f"start again with lower logits_lr / params_lr and grad_clip set")
        else:
            kept = f"the last good checkpoint is {self._kept()}"
            how = (f"continue from it with lower learning rates and gradient clipping, e.g. "
                   f"{self._command(flags)}" if self._recipe_file() else
                   f"continue from it (Trainer.fit(resume=...)) with lower logits_lr / "
                   f"params_lr and grad_clip set")
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
