"""The prepared GPU check: every number we need from a short GPU loan, in one command, into one folder.

    python benchmarks/gpu_check.py OUT_DIR             # on the GPU machine (8 minutes at most: time-boxed)
    python benchmarks/gpu_check.py OUT_DIR --dry-run   # the same code on the CPU at tiny sizes (CI runs it)

Needs only what the GPU image has (torch, triton, lightning, transformers, pytest) plus the wheels that
``benchmarks/fetch_gpu_wheels.sh`` puts in ``.gpu-wheels/`` (liger-kernel, for the comparison). No network, no
model weights: the training steps use a randomly initialised Qwen3-shaped model built from a config.

This driver imports nothing but the standard library. Each stage runs as a process of its own, in its own process
group, killed with everything it started when its time box runs out (the device allows 600 s a command); a stage
writes its results as it goes, and ``gpu_check.json`` and ``gpu_check.md`` are rewritten after every stage, so a
run cut short still says what it measured.

Stages (each one's result, or its error, goes into the report):
0. ``install``: the carried wheels and this tree (editable, without dependencies) into the environment the other
   stages run in: this interpreter's on a GPU machine; in a dry run, a fresh environment made for it that sees this
   interpreter's packages but not this tree, so that every dry run installs as a fresh GPU machine does. New
   processes then import from it (a running one would not see the install). It also asks whether Triton's CPU
   interpreter works here (the dry run's Triton and Liger rows need it).
1. ``tests``: the kernel test suite on CUDA (Triton in float32 and bf16 against the float64 reference).
2. ``kernels``: ``bench_kernels.py`` at the paper shape (N=8192, V=151,936, H=4096, bf16): generalized_jsd and
   the fused-linear op against naive, Liger and their floors (the bare GEMMs; a read-two-write-one copy).
3. ``step``: two MOPD training steps in bf16-mixed on a ~0.6B Qwen3-shaped model (HF sampling, fused loss, EMA
   teacher, AdamW as CUDA runs it: foreach) with phase times and peak memory; that every parameter those steps
   changed is among what the rollout engine would be sent; the fused loss against the unfused one; one step with
   packed passes under SDPA; and two ``16-mixed`` steps (float16 autocast, CUDA's GradScaler, the gradient clipped
   and logged unscaled).
4. ``lora``: one bf16-mixed step each with full weights and with LoRA, each with the live student as its teacher and
   with an EMA teacher: peak memory above what was allocated before, and step time (what the EMA teacher adds).
5. ``sampling`` (run first: what the next loan most needs): the ``hf`` sampler eager and compiled
   (``model.sampling.compile``: static KV cache, CUDA graphs) on the same prompts at 64 rollouts x 256 new tokens
   on the 0.6B shape in bf16 autocast: tokens per second, the first call's compilation, peak memory, and how far
   the two paths' rollouts agree (the same seeds draw the same tokens until the numerics part them); then two
   training steps with the compiled sampler (its share of the step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".gpu-wheels"
STAGES = ("install", "sampling", "tests", "kernels", "step", "lora")
TIME_BOX_S = {"sampling": 230, "tests": 100, "kernels": 170, "step": 180, "lora": 150}  # each under 4 minutes;
# install's: 120 s each
BUDGET_S = 480  # the whole check in 8 minutes; the device runs a command for at most 600 s
# Qwen3-0.6B's shape (a random init: only speed and memory are measured), and a tiny one for --dry-run.
QWEN3_SHAPE = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                   num_key_value_heads=8, head_dim=128, vocab_size=151936)
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=512)
PROBE = """
import importlib.util, json, sys, torch, transformers, lightning, numpy, mopd_lightning, mopd_kernels
triton = importlib.util.find_spec("triton") and __import__("triton")
print(json.dumps({"python": sys.version.split()[0], "torch": torch.__version__, "triton": triton and triton.__version__,
    "transformers": transformers.__version__, "lightning": lightning.__version__, "numpy": numpy.__version__,
    "liger_kernel": importlib.util.find_spec("liger_kernel") is not None, "mopd_lightning": mopd_lightning.__file__,
    "cuda": torch.cuda.is_available(),
    "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None}))
"""
INTERPRETER_PROBE = """
import torch
from mopd_kernels import generalized_jsd
logits = torch.randn(2, 300)
generalized_jsd(logits, torch.randn(2, 300), backend="triton")
"""


# ----------------------------------------------------------------------------------------------- driver
def _tail(text: str, lines: int = 3) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])[-1500:]


def fresh_environment(folder: Path) -> str:
    """A new virtual environment that sees this interpreter's packages (a path in a ``.pth`` file: their own
    ``.pth`` files, an editable install of this tree among them, are not read) and has nothing of the project: the
    state a fresh GPU machine is in. Without pip of its own: this interpreter's pip and setuptools serve it (a
    venv's bundled setuptools can be too old for this project's metadata). Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(folder)], check=True,
                   capture_output=True, timeout=120)
    python = str(folder / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], check=True,
                             capture_output=True, text=True).stdout.strip()
    Path(purelib, "gpu_image_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def _run(command: list, what: str, **options) -> subprocess.CompletedProcess:
    """``command``, or a RuntimeError that says ``what`` failed in the command's own last words."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, **options)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {_tail(done.stderr or done.stdout, 12)}")
    return done


def install(python: str, result: dict) -> None:
    """The carried wheels and this tree into ``python``'s environment, then a new process that imports them;
    ``result`` is filled as it goes (a failure leaves what was done)."""
    wheels = sorted(WHEELS.glob("*.whl")) if WHEELS.is_dir() else []
    result["wheels"] = [w.name for w in wheels]
    if wheels:  # pip skips what is already installed
        _run([python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", *map(str, wheels)],
             "installing the carried wheels")
    result["project_importable_before"] = subprocess.run([python, "-c", "import mopd_lightning, mopd_kernels"],
                                                         capture_output=True).returncode == 0
    if not result["project_importable_before"]:
        _run([python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-build-isolation",
              "-e", str(ROOT / "kernels"), "-e", str(ROOT)], "installing the project (editable, no dependencies)")
    result["versions"] = json.loads(_run([python, "-c", PROBE], "importing after the install").stdout.splitlines()[-1])
    interpreter = subprocess.run([python, "-c", INTERPRETER_PROBE], capture_output=True, text=True, timeout=120,
                                 env={**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""})
    result["triton_interpreter"] = ("works" if interpreter.returncode == 0 else
                                    f"unusable: {_tail(interpreter.stderr, 1)}")
    result["ok"] = True


def install_stage(out: Path, dry_run: bool) -> dict:
    """Stage 0, in the driver: where the other stages will run (a fresh environment in a dry run), and the install."""
    started = time.monotonic()
    result = {"ok": False, "python": sys.executable, "fresh_environment": dry_run}
    try:
        if dry_run:
            result["python"] = fresh_environment(out / "env")
        install(result["python"], result)
    except Exception as error:  # noqa: BLE001 - the report must say what broke; the stages are then not run
        result["error"] = f"{type(error).__name__}: {error}"[:2000]
    if not dry_run and "versions" in result and not result["versions"]["cuda"]:
        result.update(ok=False, error="no CUDA device: use --dry-run to test the script on a CPU")
    result["stage_s"] = time.monotonic() - started
    return result


def stage_environment(dry_run: bool, interpreter_works: bool) -> dict:
    """A GPU run never gets Triton's interpreter (it would replace the compiled kernels, and triton 3.6's breaks on
    numpy >= 2.4), whatever the calling shell set; a dry run gets it where it works (its Triton and Liger rows)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if dry_run and interpreter_works:
        env["TRITON_INTERPRET"] = "1"
    return env


def run_stage(command: list, time_box_s: float, partial: Path, log: Path, env: dict) -> dict:
    """Run a stage's process in its own process group; at the time box kill the group (workers included). The
    result is what the stage last wrote to ``partial``, with the reason when it did not finish."""
    partial.unlink(missing_ok=True)
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        try:
            process.wait(timeout=time_box_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        try:
            os.killpg(process.pid, signal.SIGKILL)  # on a normal exit too: nothing it started outlives it
        except ProcessLookupError:
            pass
        process.wait()
    result = {"ok": False, **(json.loads(partial.read_text()) if partial.exists() else {})}
    if timed_out:
        return {**result, "ok": False, "error": f"timed out after {time_box_s:.0f} s (the rest is what it had "
                                                f"written by then)"}
    if process.returncode != 0:
        return {**result, "ok": False, "error": result.get("error") or f"exit {process.returncode}: "
                                                                      f"{_tail(log.read_text())}"}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder for gpu_check.json, gpu_check.md, the kernel tables and stage logs")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: tests the script itself")
    parser.add_argument("--only", nargs="+", choices=STAGES[1:], default=list(STAGES[1:]))
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall time for the whole check")
    parser.add_argument("--stage", choices=STAGES[1:], help=argparse.SUPPRESS)  # run one stage (in its process)
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if args.stage:
        return run_one_stage(args.stage, out, args.dry_run)
    started = time.monotonic()
    deadline = started + args.budget_s
    (out / "stages").mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join([Path(sys.executable).name] + sys.argv), "time": time.strftime("%Y-%m-%d %H:%M"),
              "host": platform.node(), "device_name": None, "dry_run": args.dry_run, "stages": {}}

    def write() -> None:
        report["wall_s"] = time.monotonic() - started
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
        (out / "gpu_check.md").write_text(markdown(report))

    installed = report["stages"]["install"] = install_stage(out, args.dry_run)
    python = installed["python"]
    versions = installed.get("versions", {})
    report["device_name"] = versions.get("device_name") or f"CPU {platform.machine()}" + (" (dry run)" * args.dry_run)
    write()
    print(f"install: {'ok' if installed['ok'] else 'FAILED'} ({installed['stage_s']:.0f} s)", flush=True)
    env = stage_environment(args.dry_run, installed.get("triton_interpreter") == "works")
    for name in args.only if installed["ok"] else []:
        time_box = min(TIME_BOX_S[name], deadline - time.monotonic())
        if time_box < 10:
            report["stages"][name] = {"ok": False, "error": "not run: the check's time budget was spent"}
            continue
        stage_start = time.monotonic()
        command = [python, str(Path(__file__).resolve()), str(out), "--stage", name] + ["--dry-run"] * args.dry_run
        report["stages"][name] = run_stage(command, time_box, out / "stages" / f"{name}.json",
                                           out / "stages" / f"{name}.log", env)
        report["stages"][name]["stage_s"] = time.monotonic() - stage_start
        write()
        print(f"{name}: {'ok' if report['stages'][name]['ok'] else 'FAILED'} "
              f"({report['stages'][name]['stage_s']:.0f} s)", flush=True)
    write()
    print(markdown(report))
    return 0 if all(stage["ok"] for stage in report["stages"].values()) else 1


# ----------------------------------------------------------------------------------------------- stages
class Partial(dict):
    """A stage's results, rewritten to disk at every change: a stage killed at its time box still reports."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.path.write_text(json.dumps(self, indent=2, default=str))


def run_one_stage(name: str, out: Path, dry_run: bool) -> int:
    results = Partial(out / "stages" / f"{name}.json")
    work = {"sampling": run_sampling, "tests": run_tests, "kernels": run_kernels, "step": run_step,
            "lora": run_lora}[name]
    try:
        work(results, out, dry_run)
    except Exception as error:  # noqa: BLE001 - recorded; the driver goes on with the next stage
        import traceback

        traceback.print_exc()
        results["error"] = f"{type(error).__name__}: {error}"[:1500]
        results["ok"] = False
    return 0


def run_tests(results: Partial, out: Path, dry_run: bool) -> None:
    """The kernel suite without the slow tests (they install from the network); on a GPU its Triton cases run on
    CUDA. The dry run takes one file's cases."""
    target = ["tests/kernels/test_kernels_fused_linear_jsd.py", "-k", "torch"] if dry_run else ["tests/kernels"]
    started = time.perf_counter()
    try:
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                              *target], cwd=ROOT, capture_output=True, text=True, timeout=TIME_BOX_S["tests"] - 15)
        stdout, ok = run.stdout, run.returncode == 0
    except subprocess.TimeoutExpired as timeout:  # keep what it printed: the dots say how far it got
        stdout, ok = timeout.stdout or b"", False
        stdout = stdout.decode(errors="replace") if isinstance(stdout, bytes) else stdout
        results["error"] = f"pytest timed out after {timeout.timeout:.0f} s"
    results["summary"] = (stdout.strip().splitlines() or [""])[-1]
    results["failures"] = [line for line in stdout.splitlines() if line.startswith("FAILED")][:20]
    results["seconds"] = time.perf_counter() - started
    results["ok"] = ok


def run_kernels(results: Partial, out: Path, dry_run: bool) -> None:
    """bench_kernels.py at the paper shape (dry run: tiny shapes; ours on Triton's interpreter when it works)."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_kernels

    device = "cuda" if torch.cuda.is_available() and not dry_run else "cpu"
    interpreter = os.environ.get("TRITON_INTERPRET") == "1"
    points = (["jsd,64,1000,0,float32", "fused,64,1000,32,float32"] if dry_run else
              ["jsd,8192,151936,0,bfloat16", "fused,8192,151936,4096,bfloat16"])
    argv = ["--device", device, "--reps", "1" if dry_run else "5", "--timeout", "60" if dry_run else "90",
            "--out-dir", str(out), "--tag", "gpu_check", "--backend", "triton" if dry_run and interpreter else "auto"]
    for point in points:
        argv += ["--point", point]
    results["backend_of_ours"] = "triton (interpreter)" if dry_run and interpreter else "auto"
    records = bench_kernels.main(argv, on_record=lambda records: results.__setitem__("results", list(records)))
    results["results"] = records
    results["ok"] = all(r.get("status") == "ok" or r["status"].startswith("skipped") for r in records)


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


def run_step(results: Partial, out: Path, dry_run: bool) -> None:
    """The training step's parts, each recorded as soon as it is done; one part's failure does not stop the next."""
    import torch

    device = "cuda" if torch.cuda.is_available() and not dry_run else "cpu"
    results["device"] = device
    with tempfile.TemporaryDirectory() as folder:
        path = build_model(Path(folder), TINY_SHAPE if dry_run else QWEN3_SHAPE)
        parts = {"training": lambda: training_steps(path, device, dry_run),
                 "packed_sdpa": lambda: packed_step(path, device, dry_run),
                 "float16": lambda: float16_steps(path, device, dry_run)}
        for name, part in parts.items():
            try:
                results[name] = part()
            except Exception as error:  # noqa: BLE001 - recorded, and the next part runs
                import traceback

                traceback.print_exc()
                results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:1500]}
    results["ok"] = all(results[name]["ok"] for name in parts)


def fit(path: Path, device: str, dry_run: bool, steps: int, callbacks=(), plugins=(), precision=None, new_tokens=256,
        compile_sampling=False, **module_args):
    """``steps`` MOPD steps through a real Lightning Trainer; returns the module and each step's logged numbers."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from mopd_lightning import MOPDModule, PromptDataModule
    from mopd_lightning.config import PeerConfig, SamplingConfig
    from mopd_lightning.data.datamodule import PromptStream

    prompts, new_tokens = (2, 8) if dry_run else (8, new_tokens)
    data = PromptDataModule(batch_size=prompts)
    data.setup("fit")
    module = MOPDModule(student=str(path), sampling=SamplingConfig(group_size=4, max_new_tokens=new_tokens,
                                                                   compile=compile_sampling),
                        peers=PeerConfig(require_success=False), **module_args)
    steps_logged = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps_logged.append({k: float(v) for k, v in trainer.callback_metrics.items()
                                 if k.startswith(("time/", "throughput/")) or k in (
                                     "train/loss", "train/response_len", "train/grad_norm", "train/padded_fraction")})

    cuda = device == "cuda"
    if precision is None and not plugins:
        precision = "bf16-mixed" if cuda else "32-true"
    trainer = pl.Trainer(max_steps=steps, accelerator="gpu" if cuda else "cpu", devices=1, precision=precision,
                         plugins=list(plugins) or None, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Record(), *callbacks])
    loader = DataLoader(PromptStream(data.datasets["train"], prompts, 0, True), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return module, steps_logged


def engine_sync_check():
    """A callback that checks, step by step, that every parameter the optimizer changed is among what the rollout
    engine would be sent next (what decides that must not miss an update, whatever the optimizer's implementation:
    the module's AdamW is foreach, CUDA's default, on every device)."""
    import lightning.pytorch as pl
    import torch

    from mopd_lightning.vllm_engine import WeightTracker, layer_key

    class EngineSyncCheck(pl.Callback):
        def __init__(self):
            self.steps = []

        def on_train_start(self, trainer, pl_module):
            self.foreach = trainer.optimizers[0].param_groups[0]["foreach"]
            self.tracker = WeightTracker()
            self.tracker.follow(trainer.optimizers[0], pl_module.student)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            for _ in self.tracker.weights(pl_module.student, self.tracker.changed_layers(pl_module.student)):
                pass  # as if everything were sent now
            self.before = {name: p.detach().cpu().clone() for name, p in pl_module.student.named_parameters()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            changed = {layer_key(name) for name, p in pl_module.student.named_parameters()
                       if not torch.equal(p.detach().cpu(), self.before[name])}
            seen = set(self.tracker.changed_layers(pl_module.student))
            self.steps.append({"layers_changed": len(changed), "layers_seen": len(seen & changed),
                               "missed": sorted(changed - seen)[:10]})

    return EngineSyncCheck()


def training_steps(path: Path, device: str, dry_run: bool) -> dict:
    import torch

    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync = engine_sync_check()
    module, steps = fit(path, device, dry_run, 2, callbacks=[sync])
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    agreement = fused_against_unfused(module, device)
    parameters = sum(p.numel() for p in module.student.parameters())
    synced = all(s["layers_changed"] > 0 and not s["missed"] for s in sync.steps) and len(sync.steps) == 2
    return {"ok": synced and agreement["ok"], "parameters": parameters, "steps": steps, "peak_memory_gb": peak_gb,
            "adamw": "foreach" if sync.foreach else "for-loop", "engine_sync": sync.steps,
            "fused_vs_unfused": agreement}


def fused_against_unfused(module, device: str) -> dict:
    """The distillation loss and its student gradient, fused linear vs logits, on the same random hidden states
    of the trained model's width, in the step's precision, every operand on the step's device (Lightning moves
    the module to the CPU when ``fit`` ends)."""
    import torch

    from mopd_kernels.fused_linear_jsd import chunk_rows
    from mopd_lightning.config import LossConfig
    from mopd_lightning.loss import distillation_loss
    from mopd_lightning.scoring import output_weight

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    weight = output_weight(module.student).detach().to(device, dtype)
    teacher_weight = output_weight(module.teacher).detach().to(device, dtype)
    # rows for three of the fused op's chunks (within one chunk both paths run the same GEMM and kernel)
    chunk = chunk_rows(1 << 20, weight.shape[0], dtype, torch_rows=False)
    rows = min(3 * chunk, 4096)
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(rows, weight.shape[1], generator=generator, device=device).to(dtype)
    noise = torch.randn(hidden.shape, generator=generator, device=device)
    teacher_hidden = (hidden.float() + 0.1 * noise).to(dtype)
    tokens = torch.ones(hidden.shape[0], device=device)
    operands = (weight, teacher_weight, hidden, teacher_hidden, tokens)
    results = {}
    for fused in (True, False):
        student_hidden = hidden.clone().requires_grad_(True)
        loss = distillation_loss(student_hidden, weight, teacher_hidden, teacher_weight, tokens,
                                 LossConfig(fused_linear=fused))
        loss.backward()
        results[fused] = (float(loss), student_hidden.grad.float())
    (fused_loss, fused_grad), (plain_loss, plain_grad) = results[True], results[False]
    loss_difference = abs(fused_loss - plain_loss) / max(abs(plain_loss), 1e-12)
    grad_difference = float((fused_grad - plain_grad).norm() / plain_grad.norm().clamp_min(1e-12))
    return {"ok": loss_difference < 1e-2 and grad_difference < 5e-2, "fused_loss": fused_loss,
            "unfused_loss": plain_loss, "relative_loss_difference": loss_difference,
            "relative_grad_difference": grad_difference, "dtype": str(dtype).replace("torch.", ""),
            "rows": rows, "chunks": -(-rows // chunk),
            "operand_devices": sorted({t.device.type for t in operands})}


def run_sampling(results: Partial, out: Path, dry_run: bool) -> None:
    """Eager against compiled sampling on the same prompts and seeds, then training steps with the compiled one
    (on the CPU in a dry run: tiny shapes, dynamo's eager backend in place of inductor)."""
    import torch

    import mopd_lightning.module as module_file
    from mopd_lightning.models import load_causal_lm, load_tokenizer

    device = "cuda" if torch.cuda.is_available() and not dry_run else "cpu"
    backend = "inductor" if device == "cuda" else "eager"
    module_file.COMPILE_BACKEND = backend
    prompts, group, new_tokens = (2, 4, 8) if dry_run else (8, 8, 256)
    for key, value in dict(device=device, backend=backend, rollouts=prompts * group, new_tokens=new_tokens).items():
        results[key] = value  # one by one: Partial writes on every item set
    with tempfile.TemporaryDirectory() as folder:
        path = build_model(Path(folder), TINY_SHAPE if dry_run else QWEN3_SHAPE)
        model, tokenizer = load_causal_lm(str(path)).to(device), load_tokenizer(str(path))
        batch = [list(tokenizer.apply_chat_template([{"role": "user", "content": f"Question {i}: {'why ' * i}"}],
                                                    add_generation_prompt=True, tokenize=True, return_dict=False))
                 for i in range(prompts)]
        seeds = [[1000 * p + k for k in range(group)] for p in range(prompts)]
        paths = {"eager": None, "compiled": backend}
        rollouts = {}
        for name, compiled in paths.items():
            timing = timed_sampling(model, tokenizer, batch, group, seeds, new_tokens, compiled, device)
            rollouts[name] = timing.pop("rollouts")
            results[name] = timing
        eager, compiled = rollouts["eager"].response_ids, rollouts["compiled"].response_ids
        prefixes = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                    for x, y in zip(eager, compiled)]
        results["agreement"] = {"identical_rollouts": sum(x == y for x, y in zip(eager, compiled)) / len(eager),
                                "common_prefix_share": sum(prefixes) / sum(map(len, eager)),
                                "mean_entropy_per_token": {name: sum(r.entropy) / sum(map(len, r.response_ids))
                                                           for name, r in rollouts.items()}}
        speedup = results["compiled"]["tokens_per_s"] / results["eager"]["tokens_per_s"]
        results["speedup"] = speedup
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        try:
            _, steps = fit(path, device, dry_run, 2, compile_sampling=True)
            results["training"] = {"ok": True, "steps": steps,
                                   "sample_share": [s["time/sample_s"] / s["time/step_s"] for s in steps]}
        except Exception as error:  # noqa: BLE001 - recorded beside the sampling numbers
            import traceback

            traceback.print_exc()
            results["training"] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:1500]}
    results["ok"] = results["training"]["ok"] and (dry_run or results["agreement"]["common_prefix_share"] > 0)


def timed_sampling(model, tokenizer, batch, group, seeds, new_tokens, compiled, device) -> dict:
    """One path's first call (compilation included) and the median of two more: tokens per second, peak memory."""
    import statistics

    import torch

    from mopd_lightning.sampling import sample_groups

    cuda = device == "cuda"
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)  # as the bf16-mixed training step

    def call():
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        with autocast:
            rollouts = sample_groups(model, tokenizer, batch, group, seeds, new_tokens, compiled=compiled)
        if cuda:
            torch.cuda.synchronize()
        return rollouts, time.perf_counter() - started

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rollouts, first_s = call()
    times = [call()[1] for _ in range(2)]
    seconds = statistics.median(times)
    tokens = sum(map(len, rollouts.response_ids))
    return {"rollouts": rollouts, "first_call_s": first_s, "call_s": times, "tokens": tokens,
            "tokens_per_s": tokens / seconds, "compile_s": max(first_s - seconds, 0.0),
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def run_lora(results: Partial, out: Path, dry_run: bool) -> None:
    """Peak memory and time of one step (128 new tokens), LoRA against full weights, with the live student as the
    teacher and with an EMA teacher: with LoRA the EMA teacher is one adapter, without it a second model."""
    import gc

    import torch

    from mopd_lightning.config import LoRAConfig, TeacherConfig

    device = "cuda" if torch.cuda.is_available() and not dry_run else "cpu"
    cuda = device == "cuda"
    results["device"] = device
    with tempfile.TemporaryDirectory() as folder:
        path = build_model(Path(folder), TINY_SHAPE if dry_run else QWEN3_SHAPE)
        for lora in (False, True):
            for kind in ("self", "ema"):
                name = f"{'lora' if lora else 'full'} / {kind} teacher"
                try:
                    gc.collect()
                    if cuda:
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated() if cuda else 0
                    module, steps = fit(path, device, dry_run, 1, new_tokens=128, lora=LoRAConfig(enabled=lora),
                                        teacher=TeacherConfig(kind=kind))
                    peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else None
                    results[name] = {"ok": bool(torch.isfinite(torch.tensor(steps[0]["train/loss"]))),
                                     "peak_memory_gb": peak, "step_s": steps[0]["time/step_s"],
                                     "trainable": sum(p.numel() for p in module.student.parameters()
                                                      if p.requires_grad)}
                    del module
                except Exception as error:  # noqa: BLE001 - recorded, and the next arm runs
                    import traceback

                    traceback.print_exc()
                    results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:1500]}
    arms = [k for k in results if " / " in k]
    results["ok"] = len(arms) == 4 and all(results[k]["ok"] for k in arms)


def packed_step(path: Path, device: str, dry_run: bool) -> dict:
    """One step with padding-free passes under SDPA (without flash-attention: one forward per row)."""
    import math

    from mopd_lightning.config import OptimConfig

    _, steps = fit(path, device, dry_run, 1, optim=OptimConfig(packed=True), attn_implementation="sdpa")
    ok = len(steps) == 1 and math.isfinite(steps[0]["train/loss"]) and steps[0]["train/padded_fraction"] == 0.0
    return {"ok": ok, "steps": steps}


def float16_steps(path: Path, device: str, dry_run: bool) -> dict:
    """Two ``16-mixed`` steps (float16 autocast and a GradScaler: CUDA's, or one forced on the CPU): finite losses,
    gradient norms logged unscaled (the scaler starts at 2**16), and the scaler's scale after them."""
    import math

    from lightning.pytorch.plugins.precision import MixedPrecision

    cuda = device == "cuda"
    module, steps = fit(path, device, dry_run, 2, **({"precision": "16-mixed"} if cuda else
                                                     {"plugins": [MixedPrecision("16-mixed", "cpu")]}))
    norms = [s["train/grad_norm"] for s in steps if "train/grad_norm" in s]
    ok = len(steps) == 2 and all(math.isfinite(s["train/loss"]) for s in steps) and all(n < 1e3 for n in norms)
    return {"ok": ok, "steps": steps, "skipped_steps": module.skipped_steps,
            "scale": module.trainer.precision_plugin.scaler.get_scale()}


# ----------------------------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device_name']}", "", f"`{report['command']}`, {report['time']}, "
             f"{report.get('wall_s', 0):.0f} s in all", ""]
    for name in STAGES:
        stage = report["stages"].get(name)
        if stage is None:
            continue
        lines.append(f"## {name}: {'ok' if stage.get('ok') else 'FAILED'} ({stage.get('stage_s', 0):.0f} s)")
        if "error" in stage:
            lines.append(f"error: `{stage['error']}`")
        if name == "install":
            lines.append(f"python `{stage.get('python')}` (fresh environment: {stage.get('fresh_environment')}); "
                         f"wheels {stage.get('wheels')}; project importable before: "
                         f"{stage.get('project_importable_before')}; Triton interpreter: "
                         f"{stage.get('triton_interpreter')}")
            lines.append(f"versions: `{json.dumps(stage.get('versions'))}`")
        if name == "tests":
            lines.append(f"{stage.get('summary', '')} ({stage.get('seconds', 0):.0f} s)")
            lines += [f"- {line}" for line in stage.get("failures", [])]
        if name == "kernels" and "results" in stage:
            interpreter = report["stages"]["install"].get("triton_interpreter")
            note = f"; Triton's interpreter (CPU Triton and Liger rows): {interpreter}" if report["dry_run"] else ""
            lines += [f"ours: {stage.get('backend_of_ours')}{note}", "",
                      "| op | N | V | H | impl | time ms | peak MiB | time / floor | status |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for r in stage["results"]:
                cells = [r["op"], r["n"], r["v"], r["h"] or "", r["impl"]]
                if r.get("status") == "ok":
                    floor = r.get("time_vs_floor", float("nan"))
                    cells += [f"{r['time_ms']:.2f}", f"{r['peak_mb']:.0f}", f"{floor:.2f}", "ok"]
                else:
                    cells += ["", "", "", r["status"]]
                lines.append("| " + " | ".join(map(str, cells)) + " |")
        if name == "step":
            lines += _step_lines(stage)
        if name == "sampling":
            lines += _sampling_lines(stage)
        if name == "lora":
            for arm, result in stage.items():
                if isinstance(result, dict):
                    peak = result.get("peak_memory_gb")
                    lines.append(f"- {arm}: " + (f"FAILED `{result['error']}`" if "error" in result else
                                 f"peak {'n/a' if peak is None else f'{peak:.2f} GB'}, step {result['step_s']:.1f} s, "
                                 f"{result['trainable'] / 1e6:.3g}M trainable"))
        lines.append("")
    return "\n".join(lines)


def _sampling_lines(stage: dict) -> list:
    lines = [f"{stage.get('rollouts')} rollouts x {stage.get('new_tokens')} new tokens on {stage.get('device')} "
             f"(compiled with {stage.get('backend')})"]
    for path in ("eager", "compiled"):
        result = stage.get(path)
        if result:
            peak = result["peak_memory_gb"]
            lines.append(f"- {path}: {result['tokens_per_s']:.0f} tokens/s, first call {result['first_call_s']:.1f} s "
                         f"(compilation about {result['compile_s']:.1f} s), peak "
                         f"{'n/a' if peak is None else f'{peak:.1f} GB'}")
    if "speedup" in stage:
        lines.append(f"- compiled / eager tokens per second: {stage['speedup']:.2f}x; agreement "
                     f"`{json.dumps(stage['agreement'])}`")
    training = stage.get("training")
    if training:
        lines.append(f"- training with the compiled sampler: {'ok' if training['ok'] else 'FAILED'}" +
                     (f" (`{training['error']}`)" if "error" in training else ""))
        for i, step in enumerate(training.get("steps", [])):
            lines.append(f"  - step {i}: sample {step.get('time/sample_s', 0):.2f} s of "
                         f"{step.get('time/step_s', 0):.2f} s")
    return lines


def _step_lines(stage: dict) -> list:
    lines = []
    for part in ("training", "packed_sdpa", "float16"):
        result = stage.get(part)
        if result is None:
            continue
        lines.append(f"- **{part}**: {'ok' if result.get('ok') else 'FAILED'}" +
                     (f" (`{result['error']}`)" if "error" in result else ""))
        if part == "training" and "parameters" in result:
            peak = "n/a" if result["peak_memory_gb"] is None else f"{result['peak_memory_gb']:.1f} GB"
            lines.append(f"  {result['parameters'] / 1e6:.3g}M parameters; AdamW {result['adamw']}; peak memory "
                         f"{peak}; engine sync {json.dumps(result['engine_sync'])}; "
                         f"fused vs unfused {json.dumps(result['fused_vs_unfused'])}")
        for i, step in enumerate(result.get("steps", [])):
            lines.append(f"  - step {i}: " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(step.items())))
        if "scale" in result:
            lines.append(f"  scaler scale after the steps {result['scale']:g}, steps skipped {result['skipped_steps']}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
