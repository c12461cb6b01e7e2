"""Peak memory and step time, LoRA against full fine-tuning, with and without an EMA teacher, in one run.

    python benchmarks/lora_memory_cpu.py [--models demo qwen2-0.5b] [--steps 2]

Models: the demo (SmolLM2-135M-Instruct) and a randomly initialised Qwen2-0.5B-shaped model built from a config
(494M parameters with its tied 151,936-row head; only memory and time are measured). Each arm runs in a process of
its own (peak RSS is per process): MOPD with an EMA teacher, and MOPD with the live student as its teacher (``self``:
no teacher weights) as the baseline the EMA teacher adds to; full weights or LoRA (rank 16, every linear layer).
Writes benchmarks/results/lora_memory_cpu.json and .md with peak RSS, the bytes of weights, trainable weights, the
teacher's weights and AdamW state, and the median step time after the first step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)
ARMS = [(lora, teacher) for lora in (False, True) for teacher in ("self", "ema")]


def build_qwen2(folder: Path) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mopd_lightning.models import load_tokenizer

    tokenizer = load_tokenizer("demo")  # its ids lie inside the larger vocabulary
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, **QWEN2_05B)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def arm(student: str, lora: bool, teacher: str, steps: int) -> dict:
    """One configuration, in this process."""
    import lightning.pytorch as pl
    import torch

    from mopd_lightning import MOPDModule, PromptDataModule
    from mopd_lightning.config import LoRAConfig, OptimConfig, PeerConfig, SamplingConfig, TeacherConfig

    times = []

    class StepTime(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            times.append(float(trainer.callback_metrics["time/step_s"]))

    module = MOPDModule(student=student, teacher=TeacherConfig(kind=teacher), lora=LoRAConfig(enabled=lora),
                        sampling=SamplingConfig(group_size=2, max_new_tokens=16),
                        peers=PeerConfig(n_success=1, n_failure=1), optim=OptimConfig(warmup_steps=0))
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[StepTime()])
    trainer.fit(module, datamodule=PromptDataModule(batch_size=2, val=None))
    optimizer = trainer.optimizers[0]
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    params = list(module.student.parameters())
    teacher = list(module.teacher.parameters()) if module.teacher is not None else []
    adapter_teacher = [p for n, p in module.student.named_parameters() if ".teacher." in n and "lora_" in n]
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "weights_gb": nbytes(params) / 2**30,
            "trainable_gb": nbytes([p for p in params if p.requires_grad]) / 2**30,
            "teacher_gb": nbytes(teacher + adapter_teacher) / 2**30, "adamw_state_gb": nbytes(state) / 2**30,
            "step_s": statistics.median(times[1:] or times), "steps": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["demo", "qwen2-0.5b"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lora_memory_cpu"))
    parser.add_argument("--arm", nargs=3, help=argparse.SUPPRESS)  # student lora teacher: run one arm, print JSON
    args = parser.parse_args()
    if args.arm:
        student, lora, teacher = args.arm
        print("RESULT " + json.dumps(arm(student, lora == "lora", teacher, args.steps)), flush=True)
        return

    started, load_before = time.perf_counter(), os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for model in args.models:
            student = build_qwen2(Path(scratch) / "qwen2") if model == "qwen2-0.5b" else model
            for lora, teacher in ARMS:
                name = f"{model} / {'lora' if lora else 'full'} / {teacher} teacher"
                run = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--arm", student,
                                      "lora" if lora else "full", teacher], capture_output=True, text=True)
                line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise RuntimeError(f"{name} failed:\n{run.stderr[-3000:]}")
                results[name] = json.loads(line[len("RESULT "):])
                print(name, results[name], flush=True)
    ratios = {}
    for model in args.models:
        for kind in ("full", "lora"):
            ema, live = results[f"{model} / {kind} / ema teacher"], results[f"{model} / {kind} / self teacher"]
            ratios[f"{model}, {kind}: peak RSS with an EMA teacher / with the live student as teacher"] = (
                ema["peak_rss_gb"] / live["peak_rss_gb"])
        lora, full = results[f"{model} / lora / ema teacher"], results[f"{model} / full / ema teacher"]
        ratios[f"{model}: peak RSS, LoRA / full (EMA teacher)"] = lora["peak_rss_gb"] / full["peak_rss_gb"]
        ratios[f"{model}: step time, LoRA / full (EMA teacher)"] = lora["step_s"] / full["step_s"]
    import torch

    result = {"command": " ".join([Path(sys.executable).name] + sys.argv),
              "device": f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, load "
                        f"average before: {load_before:.1f}, nothing else running",
              "torch": torch.__version__, "runs": results, "ratios": ratios, "wall_s": time.perf_counter() - started}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = ["# LoRA against full fine-tuning: memory and step time (CPU, float32)", "",
             f"Device: {result['device']}; command: `{result['command']}`; {result['wall_s']:.0f} s in all. "
             "2 prompts x 2 rollouts x 16 new tokens a step; LoRA rank 16 on every linear layer; peak RSS of the "
             "arm's process.",
             "", "| model / weights / teacher | peak RSS GiB | weights GiB | trainable GiB | teacher GiB "
             "| AdamW state GiB | step s |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['peak_rss_gb']:.2f} | {r['weights_gb']:.3f} | {r['trainable_gb']:.3f} | "
                     f"{r['teacher_gb']:.3f} | {r['adamw_state_gb']:.3f} | {r['step_s']:.1f} |")
    lines += ["", *[f"- {name}: {value:.3f}" for name, value in ratios.items()]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
