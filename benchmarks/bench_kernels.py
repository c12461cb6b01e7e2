"""Benchmark the distillation kernels: naive eager PyTorch vs Liger-Kernel (when importable) vs mopd_kernels.

For each point (op, N, V, H, dtype) and implementation it measures forward+backward time (median of --reps
after one warm-up) and peak memory above the inputs (CUDA: torch.cuda.max_memory_allocated; CPU: peak RSS,
VmHWM from /proc after resetting it through /proc/self/clear_refs). Every (point, implementation) runs in
a fresh subprocess so that one measurement's allocator caches cannot hide the next one's memory.
Writes JSON, a Markdown table and a PNG plot to benchmarks/results/.

    python benchmarks/bench_kernels.py            # default points for the device found
    python benchmarks/bench_kernels.py --quick    # small shapes, a few seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# (op, N, V, H, dtype). H is unused by "jsd".
POINTS = {
    "cpu": [("jsd", 4096, 49152, 0, "float32"), ("jsd", 4096, 49152, 0, "bfloat16"),
            ("fused", 4096, 49152, 576, "float32")],
    "cuda": [("jsd", 4096, 49152, 0, "float32"), ("jsd", 8192, 151936, 0, "bfloat16"),
             ("fused", 4096, 49152, 576, "float32"), ("fused", 8192, 151936, 896, "bfloat16"),
             ("fused", 8192, 151936, 4096, "bfloat16")],  # the paper's shape: Qwen3-8B, 8192 response tokens
    "quick": [("jsd", 256, 4096, 0, "float32"), ("fused", 256, 4096, 64, "float32")],
}
COLORS = {"matmuls": "tab:gray", "copy": "tab:gray", "naive": "tab:blue", "liger": "tab:orange", "ours": "tab:green"}
# The floor of each op, measured in the same run: "copy" reads both logits and writes a gradient once (what a
# memory-bound generalized_jsd cannot avoid); "matmuls" are the four matmuls any fused-linear loss must do.
FLOORS = {"jsd": "copy", "fused": "matmuls"}
IMPLS = {"jsd": ["copy", "naive", "liger", "ours"], "fused": ["matmuls", "naive", "liger", "ours"]}
# Targets from issue 3 (ours / naive), checked at their point: CPU, N=4096, V=49152, (H=576,) float32.
TARGETS = {"jsd": {"memory": 0.25, "time": 1.0, "point": (4096, 49152, 0, "float32")},
           "fused": {"memory": 0.20, "time": 1.2, "point": (4096, 49152, 576, "float32")}}


# ----------------------------------------------------------------------------------------------- worker
def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def liger_loss(op: str, alpha: float, temperature: float):
    """Liger-Kernel's loss for ``op`` in our convention (its ``beta`` is our ``alpha``): ``jsd`` takes logits (the
    log_softmax Liger needs is part of its cost), ``fused`` takes (student hidden, weight, teacher hidden, weight)."""
    import torch

    if op == "jsd":
        from liger_kernel.transformers.jsd import LigerJSD

        jsd = LigerJSD(beta=alpha)
        return lambda student, teacher: jsd(torch.log_softmax(student.float() / temperature, -1),
                                            torch.log_softmax(teacher.float() / temperature, -1))
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

    fused = LigerFusedLinearJSD(jsd_beta=alpha, temperature=temperature)
    return lambda hs, ws, ht, wt: fused(hs, ws, ht, wt, None)  # no labels: every row counts


def _make_step(op, impl, n, v, h, dtype, device, alpha, temperature, backend="auto"):
    """Build inputs and return a closure running one forward+backward, or raise ImportError (skip)."""
    import torch

    from mopd_kernels import fused_linear_generalized_jsd, generalized_jsd
    from mopd_kernels._common import interpreter_on
    from mopd_kernels.reference import fused_linear_generalized_jsd_reference, generalized_jsd_reference

    g = torch.Generator(device=device).manual_seed(0)  # on the device: a serial CPU generator takes minutes at 1e9
    dt = getattr(torch, dtype)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    if impl == "liger" and device == "cpu" and not interpreter_on():
        raise ImportError("Liger-Kernel runs on the CPU only under Triton's interpreter (TRITON_INTERPRET=1)")
    if op == "jsd":
        student = randn(n, v, scale=2.0).requires_grad_(True)
        teacher = randn(n, v, scale=2.0)
        if impl == "copy":
            grad = torch.empty_like(student)

            def fn():
                with torch.no_grad():
                    torch.add(student, teacher, out=grad)
                return None
        elif impl == "naive":
            fn = lambda: generalized_jsd_reference(student, teacher, alpha=alpha, temperature=temperature)  # noqa: E731
        elif impl == "ours":
            fn = lambda: generalized_jsd(student, teacher, alpha=alpha, temperature=temperature,  # noqa: E731
                                         backend=backend)
        elif impl == "liger":
            loss = liger_loss(op, alpha, temperature)
            fn = lambda: loss(student, teacher)  # noqa: E731
        leaves = [student]
    else:
        hs = randn(n, h).requires_grad_(True)
        ws = randn(v, h, scale=h**-0.5 * 4).requires_grad_(True)
        ht = randn(n, h)
        wt = randn(v, h, scale=h**-0.5 * 4)
        kw = {"alpha": alpha, "temperature": temperature}
        if impl == "matmuls":  # the four matmuls any fused implementation must do: the lower bound
            grad_logits = randn(n, v, scale=1e-4)

            def fn():
                with torch.no_grad():
                    hs @ ws.T, ht @ wt.T, grad_logits @ ws, grad_logits.T @ hs
                return None
        elif impl == "naive":
            fn = lambda: fused_linear_generalized_jsd_reference(hs, ws, ht, wt, **kw)  # noqa: E731
        elif impl == "ours":
            fn = lambda: fused_linear_generalized_jsd(hs, ws, ht, wt, **kw, backend=backend)  # noqa: E731
        elif impl == "liger":
            loss = liger_loss(op, alpha, temperature)
            fn = lambda: loss(hs, ws, ht, wt)  # noqa: E731
        leaves = [hs, ws]

    def step():
        loss = fn()
        if loss is not None:
            loss.backward()
        for x in leaves:
            x.grad = None

    return step


def worker(spec: dict) -> dict:
    import gc

    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    cuda = device == "cuda"
    step = _make_step(spec["op"], spec["impl"], spec["n"], spec["v"], spec["h"], spec["dtype"], device,
                      spec["alpha"], spec["temperature"], spec["backend"])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gc.collect()
    # Peak memory of the first forward+backward, above what the inputs already hold.
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_mb("VmRSS")
    step()
    sync()
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _rss_mb("VmHWM") - base
    times = []
    for _ in range(spec["reps"]):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"time_ms": 1e3 * statistics.median(times), "times_ms": [1e3 * t for t in times], "peak_mb": peak_mb}


# ----------------------------------------------------------------------------------------------- driver
def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} cores)"


def run_point(point, impl, args, device):
    op, n, v, h, dtype = point
    spec = {"op": op, "impl": impl, "n": n, "v": v, "h": h, "dtype": dtype, "device": device, "reps": args.reps,
            "alpha": args.alpha, "temperature": args.temperature, "threads": args.threads, "backend": args.backend}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "status": f"timeout after {args.timeout}s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or [f"exit code {out.returncode}"]
        return {**spec, "status": "failed: " + tail[0][:300]}
    return {**spec, **json.loads(lines[-1])}


def ratios(records):
    """time and memory of each implementation relative to naive, and time relative to the op's floor."""
    key = lambda r: (r["op"], r["n"], r["v"], r["h"], r["dtype"])  # noqa: E731
    naive = {key(r): r for r in records if r["impl"] == "naive" and r.get("status") == "ok"}
    floor = {key(r): r for r in records if r["impl"] == FLOORS[r["op"]] and r.get("status") == "ok"}
    for r in records:
        base = naive.get(key(r))
        if base and r.get("status") == "ok":
            r["time_vs_naive"] = r["time_ms"] / base["time_ms"]
            r["memory_vs_naive"] = r["peak_mb"] / base["peak_mb"] if base["peak_mb"] > 0 else None
        if key(r) in floor and r.get("status") == "ok":
            r["time_vs_floor"] = r["time_ms"] / floor[key(r)]["time_ms"]
        target = TARGETS[r["op"]]
        if r["impl"] == "ours" and "time_vs_naive" in r and (r["n"], r["v"], r["h"], r["dtype"]) == target["point"]:
            r["meets_target"] = bool(r["time_vs_naive"] <= target["time"]
                                     and (r["memory_vs_naive"] or 0) <= target["memory"])


def markdown(records, meta) -> str:
    lines = [f"# Kernel benchmark: {meta['device_name']}", "",
             f"`{meta['command']}`  ", f"torch {meta['torch']}, triton {meta['triton']}, {meta['time']}, "
             f"alpha={meta['alpha']}, temperature={meta['temperature']}, median of {meta['reps']} reps, "
             f"{meta['threads']} threads, 1-min load average {meta['load_before']:.1f} before / "
             f"{meta['load_after']:.1f} after", "",
             "Time: forward+backward. Peak: memory above the inputs during the first forward+backward "
             "(CPU: peak RSS). Targets (ours vs naive): generalized_jsd memory <= 25 %, time <= 1.0x; "
             "fused linear memory <= 20 %, time <= 1.2x. Floors: `matmuls` = the four bare matmuls of the fused "
             "op, `copy` = reading both logits and writing a gradient once (generalized_jsd is memory-bound).", "",
             "| op | N | V | H | dtype | impl | time (ms) | peak (MiB) | time / naive | peak / naive | time / floor "
             "| status |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        ok = r.get("status") == "ok"
        fmt = lambda k, f: (f.format(r[k]) if r.get(k) is not None else "")  # noqa: E731
        status = ("target met" if r.get("meets_target") else ("target missed" if "meets_target" in r else "ok")) \
            if ok else r["status"]
        lines.append(f"| {r['op']} | {r['n']} | {r['v']} | {r['h'] or ''} | {r['dtype']} | {r['impl']} | "
                     f"{fmt('time_ms', '{:.1f}') if ok else ''} | {fmt('peak_mb', '{:.0f}') if ok else ''} | "
                     f"{fmt('time_vs_naive', '{:.2f}x')} | {fmt('memory_vs_naive', '{:.1%}')} | "
                     f"{fmt('time_vs_floor', '{:.2f}x')} | {status} |")
    return "\n".join(lines) + "\n"


def plot(records, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    ok = [r for r in records if r.get("status") == "ok"]
    points = list(dict.fromkeys((r["op"], r["n"], r["v"], r["h"], r["dtype"]) for r in ok))
    impls = [i for i in ("matmuls", "naive", "liger", "ours") if any(r["impl"] == i for r in ok)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        for ax, field in zip(axes, ("time_ms", "peak_mb")):
            if impl == "matmuls" and field == "peak_mb":
                continue  # its memory is that of its made-up inputs: meaningless
            xs, ys = [], []
            for i, p in enumerate(points):
                r = next((r for r in ok if r["impl"] == impl and (r["op"], r["n"], r["v"], r["h"], r["dtype"]) == p),
                         None)
                if r is not None:
                    xs.append(i + k * width)
                    ys.append(r[field])
            ax.bar(xs, ys, width, label=impl, color=COLORS[impl])
    labels = [f"{op}\nN={n} V={v}" + (f" H={h}" if h else "") + f"\n{dt}" for op, n, v, h, dt in points]
    for ax, name in zip(axes, ("forward+backward time (ms)", "peak memory above inputs (MiB)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(points))], labels, fontsize=8)
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None, on_record=None) -> list:
    """Measure every (point, implementation); the JSON and Markdown files are rewritten after each measurement
    (a run cut short still leaves its table), the plot at the end. ``on_record(records)`` is called likewise."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--op", choices=["jsd", "fused", "all"], default="all")
    p.add_argument("--impl", nargs="*", default=None, help="subset of: copy matmuls naive liger ours")
    p.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto",
                   help="backend of ours (auto: Triton on CUDA, torch on the CPU; triton on the CPU: the interpreter)")
    p.add_argument("--point", action="append", default=None, metavar="OP,N,V,H,DTYPE",
                   help="custom point, e.g. jsd,4096,49152,0,float32 (repeatable)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions after the warm-up (median)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per measurement")
    p.add_argument("--tag", default="", help="suffix for the output file names")
    p.add_argument("--out-dir", default=str(RESULTS), help="folder for the JSON, Markdown and PNG files")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps({**worker(json.loads(args.worker)), "status": "ok"}))
        return []

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.point:
        points = [(op, int(n), int(v), int(h), dt) for op, n, v, h, dt in (s.split(",") for s in args.point)]
    else:
        points = POINTS["quick" if args.quick else device]
    points = [pt for pt in points if args.op in ("all", pt[0])]
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    meta = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "device": device,
            "device_name": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "alpha": args.alpha, "temperature": args.temperature,
            "reps": args.reps, "threads": args.threads or torch.get_num_threads(), "python": platform.python_version(),
            "backend": args.backend, "load_before": os.getloadavg()[0]}  # a shared machine's load skews CPU timings
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (f"kernels_{device}" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else ""))
    records = []
    for point in points:
        for impl in IMPLS[point[0]]:
            if args.impl and impl not in args.impl:
                continue
            r = run_point(point, impl, args, device)
            if r.get("status", "").startswith("failed: ImportError") or "ModuleNotFoundError" in r.get("status", ""):
                r["status"] = "skipped: " + r["status"].split(": ", 2)[-1]
            records.append(r)
            shown = f"{r['time_ms']:.1f} ms, {r['peak_mb']:.0f} MiB" if r.get("status") == "ok" else r["status"]
            print(f"{point} {impl:8s} {shown}", flush=True)
            meta["load_after"] = os.getloadavg()[0]
            ratios(records)
            stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": records}, indent=2))
            stem.with_suffix(".md").write_text(markdown(records, meta))
            if on_record is not None:
                on_record(records)
    plot(records, stem.with_suffix(".png"), f"{meta['device_name']} - {meta['command']}")
    print(markdown(records, meta))
    print(f"wrote {stem}.{{json,md,png}}")
    return records


if __name__ == "__main__":
    main()
