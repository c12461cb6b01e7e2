"""The prepared GPU check: every number we need from a short GPU loan, in one command, into one folder.

    python benchmarks/gpu_check.py OUT_DIR             # on the GPU machine (under 8 minutes on one H100)
    python benchmarks/gpu_check.py OUT_DIR --dry-run   # the same code on CPU at tiny sizes (CI runs this)

Needs only what the GPU image has (torch, triton, lightning, transformers) plus the small wheels that
``benchmarks/fetch_gpu_wheels.sh`` puts in ``.gpu-wheels/`` (liger-kernel and the pure-Python packages this
project imports that the image lacks); they are installed from there, offline, when missing. No network, no
model weights: the training step uses a randomly initialised Qwen3-shaped model built from a config.

Sections (each one's result, or its error, goes into ``gpu_check.json``; ``gpu_check.md`` is the summary):
1. ``tests``: the kernel test suite on CUDA (Triton in float32 and bf16 against the float64 reference).
2. ``kernels``: ``bench_kernels.py`` at the paper shape (N=8192, V=151,936, H=4096, bf16): generalized_jsd and
   the fused-linear op against naive, Liger and their floors (the bare GEMMs; a read-two-write-one copy).
3. ``step``: two MOPD training steps in bf16-mixed on a ~0.6B Qwen3-shaped model (HF sampling, fused loss, EMA
   teacher): phase times, peak memory, and the fused loss against the unfused one on the same hidden states.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".gpu-wheels"
SECTIONS = ("tests", "kernels", "step")
# Qwen3-0.6B's shape (a random init: only speed and memory are measured), and a tiny one for --dry-run.
QWEN3_SHAPE = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                   num_key_value_heads=8, head_dim=128, vocab_size=151936)
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=512)


def install_carried_wheels() -> list:
    """Install, offline, the carried wheels (pip skips what is already there) and this tree without its
    dependencies (the image has torch, lightning and transformers); return the wheels' names."""
    wheels = sorted(WHEELS.glob("*.whl")) if WHEELS.is_dir() else []
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                        *map(str, wheels)], check=True)
    if importlib.util.find_spec("mopd_lightning") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "-e", str(ROOT / "kernels"), "-e", str(ROOT)], check=True)
    return [w.name for w in wheels]


def run_tests(dry_run: bool) -> dict:
    """The kernel suite; on a GPU its Triton cases run on CUDA. The dry run takes one file's torch cases."""
    target = ["tests/kernels/test_kernels_fused_linear_jsd.py", "-k", "torch"] if dry_run else ["tests/kernels"]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *target], cwd=ROOT,
                            capture_output=True, text=True)
    summary = (result.stdout.strip().splitlines() or [""])[-1]
    return {"ok": result.returncode == 0, "summary": summary, "seconds": time.perf_counter() - started,
            "failures": [line for line in result.stdout.splitlines() if line.startswith("FAILED")][:20]}


def run_kernels(out: Path, dry_run: bool, device: str) -> dict:
    """bench_kernels.py at the paper shape (dry run: tiny shapes), its tables written into ``out``."""
    points = (["jsd,64,1000,0,float32", "fused,64,1000,32,float32"] if dry_run else
              ["jsd,8192,151936,0,bfloat16", "fused,8192,151936,4096,bfloat16"])
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--device", device, "--reps",
               "1" if dry_run else "5", "--out-dir", str(out), "--tag", "gpu_check"]
    for point in points:
        command += ["--point", point]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        return {"ok": False, "error": result.stderr.strip().splitlines()[-1:]}
    records = json.loads((out / f"kernels_{device}_gpu_check.json").read_text())["results"]
    return {"ok": all(r.get("status") == "ok" or r["status"].startswith("skipped") for r in records),
            "results": records}


def build_model(folder: Path, shape: dict) -> Path:
    """A random Qwen3 with the tiny test tokenizer (ids beyond it decode to nothing; the verifier then fails)."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import build_tiny_model

    build_tiny_model(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    config = Qwen3Config(**shape, max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    Qwen3ForCausalLM(config).save_pretrained(folder)
    return folder


def run_step(dry_run: bool, device: str) -> dict:
    """Two MOPD steps (HF sampling, fused loss, EMA teacher) and the fused-vs-unfused loss check."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from mopd_lightning import MOPDModule, PromptDataModule
    from mopd_lightning.config import PeerConfig, SamplingConfig
    from mopd_lightning.data.datamodule import PromptStream

    prompts, new_tokens = (2, 8) if dry_run else (8, 256)
    with tempfile.TemporaryDirectory() as folder:
        path = build_model(Path(folder), TINY_SHAPE if dry_run else QWEN3_SHAPE)
        data = PromptDataModule(batch_size=prompts)
        data.setup("fit")
        module = MOPDModule(student=str(path), sampling=SamplingConfig(group_size=4, max_new_tokens=new_tokens),
                            peers=PeerConfig(require_success=False))
        steps = []

        class Record(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                steps.append({k: float(v) for k, v in trainer.callback_metrics.items()
                              if k.startswith(("time/", "throughput/")) or k in ("train/loss", "train/response_len")})

        cuda = device == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer = pl.Trainer(max_steps=2, accelerator="gpu" if cuda else "cpu", devices=1,
                             precision="bf16-mixed" if cuda else "32-true", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
        trainer.fit(module, train_dataloaders=DataLoader(PromptStream(data.datasets["train"], prompts, 0, True),
                                                         batch_size=None))
        peak_gb = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        agreement = fused_against_unfused(module, device)
    params = sum(p.numel() for p in module.student.parameters())
    return {"ok": agreement["relative_loss_difference"] < 1e-2 and agreement["relative_grad_difference"] < 5e-2,
            "parameters": params, "steps": steps, "peak_memory_gb": peak_gb, "fused_vs_unfused": agreement}


def fused_against_unfused(module, device: str) -> dict:
    """The distillation loss and its student gradient, fused linear vs logits, on the same random hidden states
    of the trained model's width, in the step's precision."""
    import torch

    from mopd_lightning.config import LossConfig
    from mopd_lightning.loss import distillation_loss
    from mopd_lightning.scoring import output_weight

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    weight = output_weight(module.student).detach().to(dtype)
    teacher_weight = output_weight(module.teacher).detach().to(dtype)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(512, weight.shape[1], generator=generator).to(device, dtype)
    teacher_hidden = (hidden.float() + 0.1 * torch.randn(hidden.shape, generator=generator).to(device)).to(dtype)
    tokens = torch.ones(hidden.shape[0], device=device)
    results = {}
    for fused in (True, False):
        student_hidden = hidden.clone().requires_grad_(True)
        loss = distillation_loss(student_hidden, weight, teacher_hidden, teacher_weight, tokens,
                                 LossConfig(fused_linear=fused))
        loss.backward()
        results[fused] = (float(loss), student_hidden.grad.float())
    (fused_loss, fused_grad), (plain_loss, plain_grad) = results[True], results[False]
    return {"fused_loss": fused_loss, "unfused_loss": plain_loss,
            "relative_loss_difference": abs(fused_loss - plain_loss) / max(abs(plain_loss), 1e-12),
            "relative_grad_difference": float((fused_grad - plain_grad).norm() / plain_grad.norm().clamp_min(1e-12))}


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device_name']}", "", f"`{report['command']}`, {report['time']}, "
             f"torch {report['torch']}, {report['wall_s']:.0f} s in all", ""]
    for name in SECTIONS:
        section = report["sections"].get(name)
        if section is None:
            continue
        lines.append(f"## {name}: {'ok' if section.get('ok') else 'FAILED'}")
        if "error" in section:
            lines.append(f"error: `{section['error']}`")
        if name == "tests":
            lines.append(f"{section.get('summary', '')} ({section.get('seconds', 0):.0f} s)")
            lines += [f"- {line}" for line in section.get("failures", [])]
        if name == "kernels" and "results" in section:
            lines += ["", "| op | N | V | H | impl | time ms | peak MiB | time / floor | status |", "|---|---|---|---|---|---|---|---|---|"]
            for r in section["results"]:
                ok = r.get("status") == "ok"
                lines.append(f"| {r['op']} | {r['n']} | {r['v']} | {r['h'] or ''} | {r['impl']} | "
                             f"{r['time_ms']:.2f} | {r['peak_mb']:.0f} | {r.get('time_vs_floor', float('nan')):.2f} | "
                             f"{r.get('status')} |" if ok else
                             f"| {r['op']} | {r['n']} | {r['v']} | {r['h'] or ''} | {r['impl']} | | | | {r['status']} |")
        if name == "step" and "steps" in section:
            lines.append(f"{section['parameters'] / 1e6:.0f}M parameters; peak memory "
                         f"{section['peak_memory_gb'] or float('nan'):.1f} GB; fused vs unfused: "
                         f"{json.dumps(section['fused_vs_unfused'])}")
            for i, step in enumerate(section["steps"]):
                lines.append(f"- step {i}: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(step.items())))
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder for gpu_check.json, gpu_check.md and the kernel tables")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: tests the script itself")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    installed = [] if args.dry_run else install_carried_wheels()

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu" and not args.dry_run:
        raise SystemExit("no CUDA device: use --dry-run to test the script on a CPU")
    report = {"command": " ".join([Path(sys.executable).name] + sys.argv), "time": time.strftime("%Y-%m-%d %H:%M"),
              "device_name": torch.cuda.get_device_name() if device == "cuda" else f"CPU {platform.machine()} (dry run)",
              "torch": torch.__version__, "installed_wheels": installed, "sections": {}}
    work = {"tests": lambda: run_tests(args.dry_run), "kernels": lambda: run_kernels(out, args.dry_run, device),
            "step": lambda: run_step(args.dry_run, device)}
    for name in args.only:  # one section's failure is recorded, and the others still run
        section_start = time.perf_counter()
        try:
            report["sections"][name] = work[name]()
        except Exception as error:  # noqa: BLE001 - the report must say what broke, and go on
            report["sections"][name] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:1000]}
        report["sections"][name]["section_s"] = time.perf_counter() - section_start
        print(f"{name}: {'ok' if report['sections'][name]['ok'] else 'FAILED'} "
              f"({report['sections'][name]['section_s']:.0f} s)", flush=True)
        (out / "gpu_check.json").write_text(json.dumps({**report, "wall_s": time.perf_counter() - started}, indent=2))
    report["wall_s"] = time.perf_counter() - started
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(section["ok"] for section in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
