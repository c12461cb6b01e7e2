"""Time one MOPD step on the demo model: 4 prompts x 4 rollouts x 64 new tokens, per phase.

    python benchmarks/step_cpu.py [--steps 2] [--loss-backend auto]

Writes benchmarks/results/step_cpu.json and .md. Target on a 2-core CPU: the whole step within 45 s,
teacher scoring within a quarter of it. The first step includes one-off warm-up; the table shows each step.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from mopd_lightning import MOPDModule, PromptDataModule
from mopd_lightning.config import SamplingConfig
from mopd_lightning.data.datamodule import PromptStream

PHASES = ("sample", "verify", "teacher", "student")


class StepTimes(pl.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        row = {phase: float(metrics[f"time/{phase}_s"]) for phase in PHASES}
        row["step"] = float(metrics["time/step_s"])
        row["tokens_per_s"] = float(metrics["throughput/tokens_per_s"])
        row["response_len"] = float(metrics["train/response_len"])
        self.rows.append(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_cpu"))
    args = parser.parse_args()

    data = PromptDataModule(batch_size=args.prompts)
    data.setup("fit")
    module = MOPDModule(sampling=SamplingConfig(group_size=args.group_size, max_new_tokens=args.max_new_tokens))
    timer = StepTimes()
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    loader = DataLoader(PromptStream(data.datasets["train"], args.prompts, 0, True), batch_size=None)
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    result = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "device": f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "shape": {"prompts": args.prompts, "group_size": args.group_size, "max_new_tokens": args.max_new_tokens},
        "steps": timer.rows,
        "wall_s": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# One MOPD step on the demo model ({args.prompts} prompts x {args.group_size} rollouts x "
             f"{args.max_new_tokens} new tokens)", "", f"Device: {result['device']}; command: `{result['command']}`", "",
             "| step | sample s | verify s | teacher s | student s | total s | teacher share | tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for i, row in enumerate(timer.rows):
        lines.append(f"| {i} | {row['sample']:.1f} | {row['verify']:.2f} | {row['teacher']:.1f} | {row['student']:.1f} "
                     f"| {row['step']:.1f} | {row['teacher'] / row['step']:.0%} | {row['tokens_per_s']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
