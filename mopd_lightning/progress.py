"""Progress as log lines, for runs whose output is not a terminal (a cluster job's log file), where a progress
bar is a single line rewritten in place that a log never shows."""

from __future__ import annotations

import logging
import time

import lightning.pytorch as pl

log = logging.getLogger(__name__)


class ProgressLog(pl.Callback):
    """A line per training step and per batch of validation, test and prediction (``mopd analyze``): the count,
    the time so far and an estimate of the rest; at most one line every ``every_s`` seconds per stage, the
    first and last batch always."""

    def __init__(self, every_s: float = 30.0):
        self.every_s = every_s
        self.started = {}
        self.last = {}

    def _start(self, stage: str) -> None:
        self.started[stage] = self.last[stage] = time.monotonic()

    def _batch_done(self, stage: str, done: int, total) -> None:
        now = time.monotonic()
        finite = isinstance(total, int) and 0 < total < 1 << 60
        if done != 1 and not (finite and done == total) and now - self.last.get(stage, 0.0) < self.every_s:
            return
        self.last[stage] = now
        elapsed = now - self.started.get(stage, now)
        rest = f", about {_duration(elapsed / done * (total - done))} left" if finite and done < total else ""
        log.info("%s: %d/%s, %s%s", stage, done, total if finite else "?", _duration(elapsed), rest)

    def on_train_start(self, trainer, pl_module):
        self._start("train step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._batch_done("train step", trainer.global_step, trainer.max_steps if trainer.max_steps > 0 else None)

    def on_validation_epoch_start(self, trainer, pl_module):
        self._start("validation batch")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch_done("validation batch", batch_idx + 1, sum(trainer.num_val_batches))

    def on_test_epoch_start(self, trainer, pl_module):
        self._start("test batch")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch_done("test batch", batch_idx + 1, sum(trainer.num_test_batches))

    def on_predict_epoch_start(self, trainer, pl_module):
        self._start("analysis batch")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch_done("analysis batch", batch_idx + 1, sum(trainer.num_predict_batches))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
