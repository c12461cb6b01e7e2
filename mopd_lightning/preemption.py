"""Preemption: a cluster scheduler's SIGTERM ends the run with a checkpoint to resume from, not with lost work.

Lightning already catches SIGTERM (``trainer.received_sigterm``) and stops with a ``SIGTERMException`` at the next
point it checks; this callback saves a checkpoint first, so that ``--ckpt_path`` continues the run exactly (weights,
EMA teacher, optimizer, sampling seeds and the prompt stream's position are all in the checkpoint).
"""

from __future__ import annotations

import logging
import os

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class CheckpointOnPreemption(pl.Callback):
    """Save ``preempted.ckpt`` next to the other checkpoints when SIGTERM arrives; Lightning then exits cleanly.

    Saved at the end of the training step the signal interrupted; a signal that lands after that hook (while
    loggers write, during validation) stops Lightning before the next step, and is saved as it stops.
    """

    def __init__(self, filename: str = "preempted.ckpt"):
        self.filename = filename
        self.saved = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        self.saved = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.received_sigterm:
            self.save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING:
            self.save(trainer)

    def save(self, trainer: pl.Trainer) -> None:
        if self.saved:
            return
        checkpoints = getattr(trainer.checkpoint_callback, "dirpath", None)
        if checkpoints is None:
            checkpoints = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        path = os.path.join(checkpoints, self.filename)
        trainer.save_checkpoint(path)
        self.saved = True
        if trainer.is_global_zero:
            log.warning("SIGTERM: saved %s after step %d; resume with --ckpt_path %s", path, trainer.global_step, path)
