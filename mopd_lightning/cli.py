"""The ``mopd`` command: LightningCLI over ``MOPDModule`` and ``PromptDataModule``.

``mopd fit --config configs/sci.yaml`` trains; ``validate`` and ``test`` evaluate; ``analyze`` runs the
teacher-signal analysis on validation prompts; ``--print_config`` shows every setting with its default. Logs
go to CSV, and to TensorBoard as well when it is installed, under ``trainer.default_root_dir`` (``runs/``); a
SIGTERM saves ``preempted.ckpt`` there before the run exits.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
import warnings
from typing import Any, Dict, List, Optional

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from .analysis import CONTEXT_VARIANTS, DEFAULT_VARIANTS, score_settings, summarize, write_report
from .config import ConfigError
from .data import PromptDataModule
from .data.example import DataError
from .embedded_models import ChecksumMismatch
from .execution import SandboxUnavailable
from .module import MOPDModule
from .preemption import CheckpointOnPreemption
from .progress import ProgressLog

log = logging.getLogger(__name__)


class MOPDTrainer(Trainer):
    """Lightning's Trainer plus ``analyze``."""

    def analyze(self, model: MOPDModule, datamodule: Optional[PromptDataModule] = None,
                ckpt_path: Optional[str] = None, output_dir: str = "runs/analysis",
                variants: Optional[List[str]] = None, bootstrap: int = 2000) -> Dict[str, Any]:
        """Teacher-signal analysis: does a peer context tell the teacher which rollouts are right?

        Samples groups for the validation prompts (``data.val``, ``data.num_val``), verifies them, and scores
        every rollout under each context variant; writes analysis.json, analysis.md and analysis.png.

        Args:
            model: the student (and its teacher) to analyse.
            datamodule: where the validation prompts come from.
            ckpt_path: a training checkpoint to analyse instead of the initial weights.
            output_dir: folder for the report (a relative path is taken under ``trainer.default_root_dir``).
            variants: context variants to score (default: all of none, 1S, 2S, 1F, 1S1F, 2S1F and the controls
                random_peer, unrelated_prompt, swapped_labels, success_only_matched; on request also
                2S1F_feedback_without_success and self_feedback, which show a rollout its own verifier feedback).
            bootstrap: bootstrap resamples for the 95% intervals.
        """
        variants = list(variants or DEFAULT_VARIANTS)
        unknown = [v for v in variants if v not in CONTEXT_VARIANTS]
        if unknown:
            raise ConfigError(f"analyze.variants: unknown {unknown}; known: {', '.join(CONTEXT_VARIANTS)}")
        repeated = sorted({v for v in variants if variants.count(v) > 1})
        if repeated:
            raise ConfigError(f"analyze.variants: {repeated} given more than once")
        model.analysis_variants = variants
        started = time.perf_counter()
        batches = self.predict(model, datamodule=datamodule, ckpt_path=ckpt_path, return_predictions=True) or []
        records = [record for batch in batches for record in batch]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: List[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, records)
            records = [record for part in gathered for record in part]
        summary = summarize(records, variants, samples=bootstrap, seed=model.seed)
        if self.is_global_zero:
            meta = {**score_settings(model, variants), "ckpt_path": ckpt_path, "precision": str(self.precision),
                    "seed": model.seed, "prompts": _prompt_source(datamodule), "wall_s": time.perf_counter() - started}
            folder = write_report(summary, records, os.path.join(self.default_root_dir, output_dir), meta)
            print((folder / "analysis.md").read_text())
            log.info("teacher-signal analysis written to %s", folder)
        return summary


def _prompt_source(datamodule: Optional[PromptDataModule]) -> Optional[str]:
    """Where the analysed prompts came from, for the report: ``data.val`` and ``data.num_val``."""
    if datamodule is None:
        return None
    limit = datamodule.limits["validation"]
    return f"{datamodule.val_source}" + (f" (num_val {limit})" if limit is not None else "")


def default_loggers() -> list:
    # Flushed every step: a CPU step takes seconds, and users watch metrics.csv during the run.
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "runs", "name": "csv", "flush_logs_every_n_steps": 1}}]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append({"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                        "init_args": {"save_dir": "runs", "name": "tensorboard"}})
    return loggers


class MOPDCLI(LightningCLI):
    @staticmethod
    def subcommands() -> Dict[str, set]:
        return {**LightningCLI.subcommands(), "analyze": {"model", "datamodule"}}

    def before_instantiate_classes(self) -> None:
        """Relative logger folders (the default ``runs``) are taken under ``trainer.default_root_dir``, so logs,
        the saved config and checkpoints all land where the user put the run (a cluster's scratch space)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.default_root_dir
        loggers = config.trainer.logger
        if root is None or not isinstance(loggers, list):
            return
        for logger in loggers:
            init_args = getattr(logger, "init_args", None)
            save_dir = getattr(init_args, "save_dir", None)
            if isinstance(save_dir, str) and not os.path.isabs(save_dir):
                init_args.save_dir = os.path.join(root, save_dir)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Every run saves a checkpoint when a scheduler preempts it (SIGTERM), and logs its progress as lines
        when its output is not a terminal."""
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(CheckpointOnPreemption())
        if not sys.stderr.isatty():
            trainer.callbacks.append(ProgressLog())
        return trainer


# Lightning warnings that do not apply here: the teacher is kept in eval mode on purpose, the training stream
# runs in the main process, its position is saved by PromptDataModule.state_dict (not by the DataLoader), and
# a checkpoint is meant to hold the weights after the step.
QUIET = [r".*module\(s\) in eval mode.*", r".*IterableDataset. has .__len__. defined.*",
         r".*your dataloader is not resumable.*", r".*no pre-optimization state was saved.*"]
# Lightning's log lines that advertise a product rather than say something about the run.
ADVERTS = "💡 Tip:"


def main(args=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: not record.getMessage().startswith(ADVERTS))
    try:
        MOPDCLI(
            MOPDModule,
            PromptDataModule,
            trainer_class=MOPDTrainer,
            args=args,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},  # re-running in the same folder must not fail
            trainer_defaults={"logger": default_loggers(), "log_every_n_steps": 1, "num_sanity_val_steps": 0},
        )
    except (ConfigError, DataError, SandboxUnavailable, ChecksumMismatch) as error:  # the user's to fix: one line, no traceback
        print(f"mopd: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
