"""Preemption: a cluster scheduler's SIGTERM ends the run with a checkpoint to resume from, not with lost work.

Lightning already catches SIGTERM (``trainer.received_sigterm``) and stops after the current training step; this
callback saves a checkpoint at that step's end first, so that ``--ckpt_path`` continues the run exactly (weights,
EMA teacher, optimizer, sampling seeds and the prompt stream's position are all in the checkpoint).
"""

from __future__ import annotations

import logging
import os

import lightning.pytorch as pl

log = logging.getLogger(__name__)


class CheckpointOnPreemption(pl.Callback):
    """Save ``preempted.ckpt`` next to the other checkpoints when SIGTERM arrives; Lightning then exits cleanly."""

    def __init__(self, filename: str = "preempted.ckpt"):
        self.filename = filename

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not trainer.received_sigterm:
            return
        checkpoints = getattr(trainer.checkpoint_callback, "dirpath", None)
        if checkpoints is None:
            checkpoints = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        path = os.path.join(checkpoints, self.filename)
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            log.warning("SIGTERM: saved %s after step %d; resume with --ckpt_path %s", path, trainer.global_step, path)
