"""Useful rollouts per second with and without dynamic sampling, on the demo model and the embedded science data.

    python benchmarks/dynamic_sampling_cpu.py [--steps 3] [--max-rounds 3]

A rollout is useful when its group holds both a success and a failure (GRPO's advantages and MOPD's
success-and-failure contexts need both). Both arms run the same steps from the same seed with the demo settings of
``configs/sci.yaml`` (4 prompts x 4 rollouts x 64 new tokens, the lenient verifier, the GRPO blend); the dynamic
arm draws up to ``--max-rounds`` extra batches of prompts per step. Writes
benchmarks/results/dynamic_sampling_cpu.json and .md: per step, the groups sampled and trained on, useful rollouts,
and seconds; the ratios divide the dynamic arm's useful rollouts per second by the plain arm's, measured in the
same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from mopd_lightning import MOPDModule, PromptDataModule
from mopd_lightning.config import (DynamicSamplingConfig, GRPOConfig, OptimConfig, PeerConfig, SamplingConfig,
                                   VerifierConfig)


class UsefulRollouts(pl.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        groups = metrics.get("train/dynamic_groups_kept", len(batch))
        self.rows.append({
            "groups_sampled": metrics.get("train/dynamic_groups_sampled", len(batch)), "groups_trained": groups,
            "useful_rollouts": metrics["train/mixed_group_fraction"] * groups * module.sampling.group_size,
            "sample_verify_s": metrics["time/sample_s"] + metrics["time/verify_s"], "step_s": metrics["time/step_s"],
            "short": metrics.get("train/dynamic_short", float("nan")),
        })


def run(dynamic: bool, args) -> list:
    data = PromptDataModule(batch_size=args.prompts, val=None)
    module = MOPDModule(sampling=SamplingConfig(group_size=args.group_size, max_new_tokens=args.max_new_tokens),
                        dynamic_sampling=DynamicSamplingConfig(enabled=dynamic, max_rounds=args.max_rounds),
                        verifier=VerifierConfig(strict=False), grpo=GRPOConfig(weight=0.5),
                        peers=PeerConfig(require_success=True, max_peer_tokens=128),
                        optim=OptimConfig(lr=5e-6, max_tokens_per_micro_batch=2048), seed=args.seed)
    recorder = UsefulRollouts()
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder])
    trainer.fit(module, datamodule=data)
    return recorder.rows


def per_second(rows: list, seconds: str) -> float:
    return sum(r["useful_rollouts"] for r in rows) / sum(r[seconds] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dynamic_sampling_cpu"))
    args = parser.parse_args()

    started, load_before = time.perf_counter(), os.getloadavg()[0]
    runs = {"plain": run(False, args), "dynamic": run(True, args)}
    ratios = {f"useful rollouts per second of {label}, dynamic / plain":
              per_second(runs["dynamic"], key) / max(per_second(runs["plain"], key), 1e-12)
              for key, label in (("sample_verify_s", "sampling and verification"), ("step_s", "whole steps"))}
    result = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "device": f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                  f"load average before: {load_before:.1f}, nothing else running",
        "torch": torch.__version__,
        "shape": {"prompts": args.prompts, "group_size": args.group_size, "max_new_tokens": args.max_new_tokens,
                  "max_rounds": args.max_rounds, "steps": args.steps},
        "runs": runs, "ratios": ratios, "wall_s": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# Dynamic sampling on the demo model ({args.prompts} prompts x {args.group_size} rollouts x "
             f"{args.max_new_tokens} new tokens, up to {args.max_rounds} extra rounds)", "",
             f"Device: {result['device']}; command: `{result['command']}`; {result['wall_s']:.0f} s in all.", "",
             "Useful rollouts: those in groups with both a success and a failure.", "",
             "| arm | step | groups sampled | groups trained | useful rollouts | sample+verify s | step s | short |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rows in runs.items():
        for i, row in enumerate(rows):
            lines.append(f"| {name} | {i} | {row['groups_sampled']:.0f} | {row['groups_trained']:.0f} | "
                         f"{row['useful_rollouts']:.0f} | {row['sample_verify_s']:.1f} | {row['step_s']:.1f} | "
                         f"{'' if row['short'] != row['short'] else int(row['short'])} |")
    lines += ["", *[f"- {name}: {value:.2f}" for name, value in ratios.items()]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
