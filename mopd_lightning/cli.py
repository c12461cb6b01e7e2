"""The ``mopd`` command: LightningCLI over ``MOPDModule`` and ``PromptDataModule``.

``mopd fit --config configs/sci.yaml`` trains; ``validate`` and ``test`` evaluate; ``--print_config`` shows
every setting with its default. Logs go to CSV, and to TensorBoard as well when it is installed.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

from lightning.pytorch.cli import LightningCLI

from .data import PromptDataModule
from .module import MOPDModule


def default_loggers() -> list:
    # Flushed every step: a CPU step takes seconds, and users watch metrics.csv during the run.
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "runs", "name": "csv", "flush_logs_every_n_steps": 1}}]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append({"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                        "init_args": {"save_dir": "runs", "name": "tensorboard"}})
    return loggers


# Lightning warnings that do not apply here: the teacher is kept in eval mode on purpose, the training stream
# runs in the main process, its position is saved by PromptDataModule.state_dict (not by the DataLoader), and
# a checkpoint is meant to hold the weights after the step.
QUIET = [r".*module\(s\) in eval mode.*", r".*IterableDataset. has .__len__. defined.*",
         r".*your dataloader is not resumable.*", r".*no pre-optimization state was saved.*"]


def main(args=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    LightningCLI(
        MOPDModule,
        PromptDataModule,
        args=args,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},  # re-running in the same folder must not fail
        trainer_defaults={"logger": default_loggers(), "log_every_n_steps": 1, "num_sanity_val_steps": 0},
    )


if __name__ == "__main__":
    main()
