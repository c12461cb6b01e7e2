"""The comparison benchmark end to end on the tiny model (seconds), so the script that backs the README's
numbers keeps working."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_compare_methods_writes_its_tables(tiny_model, tmp_path):
    out = tmp_path / "compare_tiny"
    command = [sys.executable, str(ROOT / "benchmarks" / "compare_methods.py"), "--steps", "1", "--seeds", "0", "1",
               "--eval-prompts", "4", "--eval-batch-size", "2", "--bootstrap", "50", "--methods", "base", "grpo",
               "--variant", "gated=--model.grpo.weight 0 --model.peers.require_success false", "--eval-split",
               "validation", "--extra", f"--model.student {tiny_model} --model.sampling.max_new_tokens 6 "
               "--data.num_train 8", "--out", str(out)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert list(report["table"]) == ["base", "grpo", "gated"]
    assert {r["arm"] for r in report["runs"]} == {"base", "grpo", "gated"} and len(report["runs"]) == 6
    base = {r["seed"]: r["prompts"] for r in report["runs"] if r["arm"] == "base"}
    assert all(r["prompts"] == base[r["seed"]] for r in report["runs"])  # differences are paired within a seed
    assert "vs_base" in report["table"]["grpo"]["greedy_strict"]
    assert all(r["split"] == "validation" and len(r["per_prompt"]["greedy_strict"]) == 4 for r in report["runs"])
    assert "vs base" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0
    assert not (tmp_path / "config.yaml").exists()


def test_paper_shape_estimate(tmp_path):
    """The model arithmetic matches Qwen3-8B's published size (8.19B parameters), and packed teacher passes never
    cost more than padding every context to 10,240 tokens."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import paper_shape_estimate as estimate
    finally:
        sys.path.pop(0)
    total = estimate.layer_params() + 2 * estimate.HIDDEN * estimate.VOCAB
    assert abs(total / 8.19e9 - 1) < 0.02
    results = [estimate.estimate(n, 0.4) for n in (512, 2048, 3072)]  # contexts within the reference's 10,240
    assert all(r["step_s_packed"] <= r["step_s_reference_padding"] for r in results)
    savings = [r["teacher_flops_saved"] for r in results]
    assert savings == sorted(savings, reverse=True) and savings[0] > 0.5


def test_gpu_check_dry_run_runs_every_section(tmp_path):
    """benchmarks/gpu_check.py is what a short GPU loan runs first: its code must work before a GPU is at hand."""
    out = tmp_path / "gpu_check"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(out), "--dry-run"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["tests", "kernels", "step"] and all(s["ok"] for s in sections.values())
    assert "passed" in sections["tests"]["summary"]
    impls = {(r["op"], r["impl"]): r["status"] for r in sections["kernels"]["results"]}
    assert impls[("jsd", "copy")] == impls[("jsd", "ours")] == impls[("fused", "matmuls")] == "ok"
    assert impls[("fused", "liger")].startswith("skipped")  # Liger needs a GPU
    step = sections["step"]
    assert len(step["steps"]) == 2 and all(s["time/teacher_s"] > 0 for s in step["steps"])
    assert step["fused_vs_unfused"]["relative_loss_difference"] < 1e-5  # float32 on the CPU
    assert "## step: ok" in (out / "gpu_check.md").read_text()
