"""The comparison benchmark end to end on the tiny model (seconds), so the script that backs the README's
numbers keeps working."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_compare_methods_writes_its_tables(tiny_model, tmp_path):
    out = tmp_path / "compare_tiny"
    command = [sys.executable, str(ROOT / "benchmarks" / "compare_methods.py"), "--steps", "1", "--seeds", "0", "1",
               "--eval-prompts", "4", "--eval-batch-size", "2", "--bootstrap", "50", "--methods", "base", "grpo",
               "--variant", "gated=--model.grpo.weight 0 --model.peers.require_success false", "--eval-split",
               "validation", "--also-eval", "math", "--extra", f"--model.student {tiny_model} "
               "--model.sampling.max_new_tokens 6 --data.num_train 8", "--out", str(out)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert list(report["table"]) == ["base", "grpo", "gated"]
    assert {r["arm"] for r in report["runs"]} == {"base", "grpo", "gated"} and len(report["runs"]) == 6
    base = {r["seed"]: r["prompts"] for r in report["runs"] if r["arm"] == "base"}
    assert all(r["prompts"] == base[r["seed"]] for r in report["runs"])  # differences are paired within a seed
    assert "vs_base" in report["table"]["grpo"]["greedy_strict"]
    assert "vs_base" in report["table"]["grpo"]["math:greedy_strict"]  # another domain's test prompts, paired too
    assert all(len(r["per_prompt"]["math:mean@4_lenient"]) == 4 for r in report["runs"])
    assert all(r["split"] == "validation" and len(r["per_prompt"]["greedy_strict"]) == 4 for r in report["runs"])
    for r in report["runs"]:  # pass@k: whether any of the k answers succeeded, so never below their mean
        best, mean = r["per_prompt"]["pass@4_lenient"], r["per_prompt"]["mean@4_lenient"]
        assert all(b in (0.0, 1.0) and b >= m and (b > 0) == (m > 0) for b, m in zip(best, mean))
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


def test_gpu_check_dry_run_runs_every_stage(tmp_path):
    """benchmarks/gpu_check.py is what a short GPU loan runs first: its dry run runs the GPU run's code on the CPU,
    from installing the project into an environment that lacks it to the report."""
    out = tmp_path / "gpu_check"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(out), "--dry-run"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    stages = report["stages"]
    assert list(stages) == ["install", "sampling", "tests", "kernels", "step", "lora"] and all(
        s["ok"] for s in stages.values()), stages
    install = stages["install"]  # a fresh environment, without the project until the check installed it
    assert install["fresh_environment"] and not install["project_importable_before"]
    assert install["versions"]["mopd_lightning"].startswith(str(ROOT)) and install["triton_interpreter"] == "works"
    assert "passed" in stages["tests"]["summary"]
    impls = {(r["op"], r["impl"]): r["status"] for r in stages["kernels"]["results"]}
    assert stages["kernels"]["backend_of_ours"] == "triton (interpreter)"
    assert all(status == "ok" for status in impls.values()), impls  # Liger's rows too, under the interpreter
    assert {impl for _, impl in impls} == {"copy", "matmuls", "naive", "liger", "ours"}
    step = stages["step"]
    training = step["training"]
    assert len(training["steps"]) == 2 and all(s["time/teacher_s"] > 0 for s in training["steps"])
    assert [s["missed"] for s in training["engine_sync"]] == [[], []]
    assert all(s["layers_changed"] > 0 for s in training["engine_sync"])
    agreement = training["fused_vs_unfused"]
    assert agreement["relative_loss_difference"] < 1e-5 and agreement["operand_devices"] == [step["device"]]
    assert step["packed_sdpa"]["steps"][0]["train/padded_fraction"] == 0.0
    assert step["float16"]["ok"] and len(step["float16"]["steps"]) == 2 and step["float16"]["scale"] > 0
    assert "## step: ok" in (out / "gpu_check.md").read_text()
    sampling = stages["sampling"]  # the same seeds: the compiled path draws the eager path's rollouts
    assert sampling["agreement"]["identical_rollouts"] == 1.0
    assert sampling["compiled"]["tokens"] == sampling["eager"]["tokens"] > 0
    assert sampling["training"]["ok"] and len(sampling["training"]["steps"]) == 2
    assert "## sampling: ok" in (out / "gpu_check.md").read_text()
    lora = stages["lora"]
    assert lora["lora / ema teacher"]["trainable"] < lora["full / ema teacher"]["trainable"] / 2


def _gpu_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check


def test_a_stage_past_its_time_box_is_killed_with_what_it_started_and_keeps_its_partial_results(tmp_path):
    partial, pid_file = tmp_path / "stage.json", tmp_path / "worker.pid"
    stage = (f"import json, subprocess, time\n"
             f"worker = subprocess.Popen(['sleep', '60'])\n"
             f"open({str(pid_file)!r}, 'w').write(str(worker.pid))\n"
             f"open({str(partial)!r}, 'w').write(json.dumps({{'measured': 1}}))\n"
             f"time.sleep(60)\n")
    started = time.monotonic()
    result = _gpu_check().run_stage([sys.executable, "-c", stage], 3, partial, tmp_path / "stage.log", dict(os.environ))
    assert time.monotonic() - started < 15
    assert result["measured"] == 1 and not result["ok"] and "timed out after 3 s" in result["error"]
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker), "the stage's worker outlived its time box"


def _alive(pid: int) -> bool:
    """Running (a killed orphan may stay a zombie until init reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_gpu_run_never_gets_the_triton_interpreter(monkeypatch):
    gpu_check = _gpu_check()
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # set by the calling shell
    assert "TRITON_INTERPRET" not in gpu_check.stage_environment(dry_run=False, interpreter_works=True)
    assert gpu_check.stage_environment(dry_run=True, interpreter_works=True)["TRITON_INTERPRET"] == "1"
    assert "TRITON_INTERPRET" not in gpu_check.stage_environment(dry_run=True, interpreter_works=False)


def test_a_failed_install_is_reported_and_no_stage_runs(tmp_path, monkeypatch):
    gpu_check = _gpu_check()

    def failing_install(python, result):
        result["wheels"] = ["liger_kernel-0.8.5-py3-none-any.whl"]
        raise RuntimeError("installing the carried wheels failed (exit 1): No space left on device")

    monkeypatch.setattr(gpu_check, "install", failing_install)
    assert gpu_check.main([str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["stages"]) == ["install"] and report["stages"]["install"]["wheels"]
    assert "No space left on device" in report["stages"]["install"]["error"]
    assert "## install: FAILED" in (tmp_path / "gpu_check.md").read_text()


def test_the_side_by_side_leaves_a_report_with_too_few_mixed_prompts_undecided(tmp_path):
    """The committed 0.5B science report has 2 prompts with both outcomes and a 2S1F interval of [0.86, 1.00]: that
    must not read as a reason to train; the code report (28 prompts) decides, and says no."""
    reports = [ROOT / "benchmarks" / "results" / f"analysis_{name}.json"
               for name in ("sci_qwen", "code_qwen", "peer_control_demo")]
    out = tmp_path / "side"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "analysis_side_by_side.py"), *map(str, reports),
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    columns = json.loads(out.with_suffix(".json").read_text())
    rule = next(row for row in columns["analysis_sci_qwen"] if row.startswith("2S1F AUC interval above 0.5"))
    assert columns["analysis_sci_qwen"][rule] == "undecided (2 prompts with both outcomes)"
    assert columns["analysis_code_qwen"][rule] == "no"
    assert columns["analysis_code_qwen"]["AUC, 2S1F"] == "0.60 [0.48, 0.71]"
    # the answer-span rows: read where the report has them, n/a where it was recorded before them
    assert columns["analysis_code_qwen"]["2S1F AUC, answer span only"] == "n/a"
    control = columns["analysis_peer_control_demo"]
    assert control["2S1F AUC, answer span only"] == "0.68 [0.57, 0.79]"
    assert control["2S1F answer span - random_peer (paired)"] == "+0.14 [+0.06, +0.22]"
    assert control["setting"].startswith("`demo`, facts")


def test_answer_token_gradient_writes_its_table(tiny_model, tmp_path):
    out = tmp_path / "gradient"
    command = [sys.executable, str(ROOT / "benchmarks" / "answer_token_gradient.py"), "--prompts", "2", "--seeds", "0",
               "--extra", f"--model.student {tiny_model} --model.sampling.max_new_tokens 6", "--out", str(out)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = json.loads(out.with_suffix(".json").read_text())["results"]
    for method in ("mopd", "grpo"):
        m = run[method]
        assert m["answer"]["tokens"] + m["rest"]["tokens"] == run["tokens"] > 0
        # the parts add up to the whole: a.w + r.w = w.w, with cosines that are cosines
        cosines = {part: m[part]["cosine_with_whole"] or 0.0 for part in ("answer", "rest")}  # None: no gradient
        assert all(abs(c) <= 1 + 1e-9 for c in cosines.values())
        projected = sum(m[part]["grad_norm"] * cosines[part] for part in ("answer", "rest"))
        assert projected == pytest.approx(m["grad_norm"], rel=1e-6)
    assert run["teacher"]["rest"]["entropy_gap"] is not None
    table = out.with_suffix(".md").read_text()
    assert "| 0 | mopd |" in table and "entropy gap: answer" in table


def test_the_stated_fact_ceiling_asks_the_same_questions_in_both_forms_and_states_the_fact(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from stated_fact_ceiling import FORMS, question_line, stated

    from mopd_lightning.data.domains import DOMAINS
    from mopd_lightning.rewards import get_verifier

    letter, name = (DOMAINS[FORMS[form]].embedded("validation", 0, None)[:8] for form in ("letter", "name"))
    for by_letter, by_name in zip(letter, name):
        assert question_line(by_letter) == question_line(by_name) and by_letter.meta == by_name.meta
        right = by_letter.meta["fact"]
        listed = by_name.ground_truth["options"]
        assert by_letter.question.index(right) > 0 and [o for o in listed if o in by_letter.question] == listed
        told = stated(by_name)
        assert told.question.endswith(by_name.question) and right in told.question.split("\n\n")[0]
        assert told.ground_truth == by_name.ground_truth  # the fact is stated, the answer still read the same way
        verify = get_verifier(told.verifier, strict=False)
        assert verify(f"It is {right}.", told.ground_truth).reward == 1.0  # the bug this replaces: always 0
