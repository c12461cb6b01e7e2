"""The ``mopd`` command end to end on the tiny model: fit, re-run, resume, DDP, and early config errors."""

import csv
import json
import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "sci.yaml"


def mopd(*args, cwd, check=True, timeout=600):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-m", "mopd_lightning.cli", *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"mopd {' '.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def tiny_args(tiny_model, steps, *extra):
    """sci.yaml on the tiny model, as pure MOPD: its random text never succeeds, so the demo's success gate and
    GRPO blend would leave nothing to train on."""
    return ["fit", "--config", CONFIG, "--model.student", tiny_model, "--model.sampling.max_new_tokens", "8",
            "--model.peers.require_success", "false", "--model.grpo.weight", "0",
            "--model.sampling.group_size", "2", "--data.batch_size", "2", "--data.num_train", "16",
            "--trainer.max_steps", steps, "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar",
            "false", "--model.optim.lr", "1e-2", *extra]


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_update(initial, a, b):
    """Both runs moved the weights the same way (Adam turns float rounding into tiny per-element noise)."""
    start, first, second = weights(initial), weights(a), weights(b)
    assert first.keys() == second.keys()
    for name in first:
        moved = (first[name] - start[name]).norm()
        assert moved > 0, name
        assert (first[name] - second[name]).norm() / moved < 1e-2, name


def grad_norms(run_folder):
    with open(Path(run_folder) / "runs" / "csv" / "version_0" / "metrics.csv") as f:
        return [float(row["train/grad_norm"]) for row in csv.DictReader(f) if row.get("train/grad_norm")]


def test_fit_two_steps_and_rerun_in_the_same_folder(tiny_model, tmp_path):
    mopd(*tiny_args(tiny_model, 2, "--model.export_dir", tmp_path / "export"), cwd=tmp_path)
    assert (tmp_path / "export" / "model.safetensors").exists()
    assert (tmp_path / "export" / "tokenizer_config.json").exists()
    metrics = glob.glob(str(tmp_path / "runs" / "csv" / "version_0" / "metrics.csv"))
    assert metrics and "train/reward" in Path(metrics[0]).read_text()
    mopd(*tiny_args(tiny_model, 1), cwd=tmp_path)  # the saved config of the first run must not block this one


def test_resume_from_checkpoint_equals_a_straight_run(tiny_model, tmp_path):
    mopd(*tiny_args(tiny_model, 3, "--model.export_dir", tmp_path / "straight"), cwd=tmp_path / ".")
    first = tmp_path / "first"
    first.mkdir()
    mopd(*tiny_args(tiny_model, 2, "--trainer.callbacks.init_args.every_n_train_steps", "1"), cwd=first)
    checkpoint = str(first / "runs" / "csv" / "version_0" / "checkpoints" / "last.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert any(k.startswith("teacher.") for k in state["state_dict"]), "the EMA teacher must be checkpointed"
    assert state["optimizer_states"] and "rng" in state["mopd"]
    mopd(*tiny_args(tiny_model, 3, "--model.export_dir", tmp_path / "resumed", "--ckpt_path", checkpoint), cwd=first)
    assert_same_update(tiny_model, tmp_path / "straight", tmp_path / "resumed")


def test_ddp_on_two_processes_equals_one_process(tiny_model, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    common = ["--data.shuffle", "false", "--model.export_dir"]
    mopd(*tiny_args(tiny_model, 2, *common, one / "export"), cwd=one)
    mopd(*tiny_args(tiny_model, 2, *common, two / "export", "--data.batch_size", "1", "--trainer.strategy", "ddp",
                    "--trainer.devices", "2", "--trainer.accelerator", "cpu"), cwd=two)
    assert_same_update(tiny_model, one / "export", two / "export")
    # The gradient itself (after the DDP average) is the same: a wrong loss normaliser would scale it.
    torch.testing.assert_close(grad_norms(one), grad_norms(two), rtol=1e-4, atol=0)


def top_level(folder):
    return sorted(path.name for path in Path(folder).iterdir())


def test_python_m_from_the_repository_root_trains(tiny_model, tmp_path):
    """``python -m`` puts the root first on sys.path, where nothing may shadow a library (transformers imports
    Hugging Face's ``kernels`` when a model loads); the run's files go under default_root_dir, not the checkout."""
    before = top_level(ROOT)
    mopd(*tiny_args(tiny_model, 1, "--trainer.default_root_dir", tmp_path), cwd=ROOT)
    assert (tmp_path / "runs" / "csv" / "version_0" / "metrics.csv").exists()
    assert top_level(ROOT) == before


def test_torchrun_launch_from_the_repository_root_equals_one_process(tiny_model, tmp_path):
    """The multi-node launch path as the README types it, from the root (torchrun sets the ranks; Lightning joins
    them, no launcher of its own)."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    common = ["--data.shuffle", "false", "--model.export_dir"]
    mopd(*tiny_args(tiny_model, 2, *common, one / "export"), cwd=one)
    args = tiny_args(tiny_model, 2, *common, two / "export", "--data.batch_size", "1", "--trainer.strategy", "ddp",
                     "--trainer.devices", "2", "--trainer.num_nodes", "1", "--trainer.accelerator", "cpu",
                     "--trainer.default_root_dir", two)
    before = top_level(ROOT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "mopd_lightning.cli", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    assert_same_update(tiny_model, one / "export", two / "export")
    assert top_level(ROOT) == before


FSDP_ON_TWO_CPUS = ["--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
                    "--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1",
                    "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--data.batch_size", "1"]


def test_fsdp_on_two_processes_equals_one_process_and_resumes_from_shards(tiny_model, tmp_path):
    """FSDP2 through ModelParallelStrategy on two CPU processes (gloo): student, EMA teacher and AdamW state
    sharded; two steps update the weights as one process does; the checkpoint is a folder of per-rank shards
    holding the teacher, and resuming from it for a third step equals a straight three-step run."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    common = ["--data.shuffle", "false", "--model.export_dir"]
    mopd(*tiny_args(tiny_model, 2, *common, one / "two_steps"), cwd=one)
    mopd(*tiny_args(tiny_model, 3, *common, one / "three_steps"), cwd=one)
    mopd(*tiny_args(tiny_model, 2, *common, two / "two_steps", *FSDP_ON_TWO_CPUS,
                    "--trainer.callbacks.init_args.every_n_train_steps", "1"), cwd=two)
    assert_same_update(tiny_model, one / "two_steps", two / "two_steps")
    torch.testing.assert_close(grad_norms(one)[:2], grad_norms(two), rtol=1e-4, atol=0)

    from torch.distributed.checkpoint import FileSystemReader

    checkpoint = two / "runs" / "csv" / "version_0" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2, "one shard file per rank"
    keys = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    assert any(k.startswith("state_dict.teacher.") for k in keys) and any(k.startswith("optimizer_0") for k in keys)
    mopd(*tiny_args(tiny_model, 3, *common, two / "three_steps", *FSDP_ON_TWO_CPUS, "--ckpt_path", checkpoint),
         cwd=two)
    assert_same_update(tiny_model, one / "three_steps", two / "three_steps")


@pytest.mark.parametrize("args,message", [
    (["--model.sampling.group_size", "1"], "model.sampling.group_size"),
    (["--model.peers.n_success", "0", "--model.peers.n_failure", "0"], "model.peers"),
    (["--model.teacher.kind", "teacher_of_the_year"], "teacher_of_the_year"),
    (["--data.train", "./missing.jsonl"], "data.train: dataset path"),
])
def test_bad_config_fails_early_naming_the_field(tiny_model, tmp_path, args, message):
    result = mopd(*tiny_args(tiny_model, 1, *args), cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert "Loading weights" not in result.stderr + result.stdout


def test_external_teacher_with_another_vocabulary_fails_before_loading(tiny_model, other_vocab_model, tmp_path):
    args = ["--model.teacher.kind", "external", "--model.teacher.path", other_vocab_model]
    result = mopd(*tiny_args(tiny_model, 1, *args), cwd=tmp_path, check=False)
    assert result.returncode != 0 and "differs from the student's" in result.stderr
    assert "Loading weights" not in result.stderr + result.stdout


def test_print_config(tmp_path):
    result = mopd("fit", "--config", CONFIG, "--print_config", cwd=tmp_path)
    assert "n_success: 2" in result.stdout and "kind: ema" in result.stdout


def test_validate_and_test_report_mean_and_pass_at_k(tiny_model, tmp_path):
    for command in ("validate", "test"):
        result = mopd(command, "--config", CONFIG, "--model.student", tiny_model, "--model.sampling.max_new_tokens", "4",
                      "--data.num_val", "4", "--data.num_test", "4", "--trainer.limit_val_batches", "1",
                      "--trainer.enable_progress_bar", "false", cwd=tmp_path)
        stage = "val" if command == "validate" else "test"
        assert f"{stage}/mean@4" in result.stdout and f"{stage}/pass@4" in result.stdout
        name = "validation" if command == "validate" else "test"
        assert f"{name} batch: 1/1," in result.stderr  # progress as log lines: the output is not a terminal


def test_model_model_is_deprecated_but_still_works(tiny_model, tmp_path):
    args = ["--model.model" if a == "--model.student" else a for a in tiny_args(tiny_model, 1)]
    result = mopd(*args, cwd=tmp_path)
    assert "model.model is deprecated; use model.student" in result.stderr


def test_analyze_writes_json_markdown_and_plot(tiny_model, tmp_path):
    result = mopd("analyze", "--config", CONFIG, "--model.student", tiny_model, "--model.sampling.max_new_tokens", "6",
                  "--data.num_val", "4", "--data.val_batch_size", "2", "--trainer.enable_progress_bar", "false",
                  "--output_dir", tmp_path / "report", "--variants", "[none, 1S1F, swapped_labels]", cwd=tmp_path)
    report = json.loads((tmp_path / "report" / "analysis.json").read_text())
    assert list(report["summary"]["variants"]) == ["none", "1S1F", "swapped_labels"]
    assert report["summary"]["prompts"] == 4 and len(report["records"]) == report["summary"]["rollouts"] > 0
    assert (tmp_path / "report" / "analysis.png").stat().st_size > 0
    table = (tmp_path / "report" / "analysis.md").read_text()
    # one row in each table: separation, coverage, use of the labels (not the label-blind control itself), the
    # answer span (when some rollout of random text read as an answer) and gap
    parts = "**Where does the signal sit?**" in table
    for name, tables in (("none", 4 + parts), ("1S1F", 4 + parts), ("swapped_labels", 3 + parts)):
        assert table.count(f"| {name} |") == tables and result.stdout.count(f"| {name} |") == tables
    assert "| 2S1F |" not in table and report["meta"]["prompts"] == "embedded (num_val 4)"
    meta = report["meta"]  # every setting that changes a score
    assert meta["peer_context"]["dont_reprompt_on_self_success"] and "context_template" in meta["peer_context"]
    assert (meta["top_p"], meta["top_k"], meta["dtype"], meta["teacher"]) == (1.0, 0, "float32", "ema")
    for line in ("analysis batch: 1/2,", "analysis batch: 2/2,", "analysis: context swapped_labels scored (3 of 3"):
        assert line in result.stderr  # progress as log lines: the output is not a terminal


@pytest.mark.parametrize("variants, error", [("[3S]", "unknown ['3S']"), ("[1S, 2S, 1S]", "['1S'] given more than once")])
def test_analyze_rejects_unknown_or_repeated_variants(tiny_model, tmp_path, variants, error):
    result = mopd("analyze", "--config", CONFIG, "--model.student", tiny_model, "--variants", variants, cwd=tmp_path,
                  check=False)
    assert result.returncode == 2 and f"mopd: error: analyze.variants: {error}" in result.stderr


def test_logs_and_checkpoints_go_under_default_root_dir(tiny_model, tmp_path):
    (tmp_path / "cwd").mkdir()
    scratch = tmp_path / "scratch"
    mopd(*tiny_args(tiny_model, 1, "--trainer.default_root_dir", scratch,
                    "--trainer.callbacks.init_args.every_n_train_steps", "1"), cwd=tmp_path / "cwd")
    run = scratch / "runs" / "csv" / "version_0"
    assert (run / "metrics.csv").exists() and (run / "config.yaml").exists()
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert list((tmp_path / "cwd").iterdir()) == []


@pytest.mark.parametrize("arrives", ["from outside, during a step", "after the step's hooks, as loggers write"])
def test_sigterm_saves_a_checkpoint_and_resuming_equals_a_straight_run(tiny_model, tmp_path, arrives):
    import signal
    import time

    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    args = [sys.executable, "-m", "mopd_lightning.cli", *map(str, tiny_args(tiny_model, 200))]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    from_outside = arrives.startswith("from outside")
    if not from_outside:  # the signal lands where a test's or a scheduler's timing cannot aim: after our hook
        args += ["--trainer.logger", "sigterm_logger.SigtermAfterTwoSteps", "--trainer.logger.save_dir", "runs",
                 "--trainer.logger.name", "csv"]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(args, cwd=interrupted, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    metrics = interrupted / "runs" / "csv" / "version_0" / "metrics.csv"
    deadline = time.monotonic() + 300
    while from_outside and time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 3:  # header + two steps
            break
        time.sleep(0.1)
    if from_outside:
        proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    checkpoint = interrupted / "runs" / "csv" / "version_0" / "checkpoints" / "preempted.ckpt"
    assert checkpoint.exists() and "resume with --ckpt_path" in stderr, stderr[-3000:]
    stopped_at = torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]
    assert 2 <= stopped_at < 200
    total = stopped_at + 2
    mopd(*tiny_args(tiny_model, total, "--model.export_dir", tmp_path / "resumed", "--ckpt_path", checkpoint),
         cwd=interrupted)
    mopd(*tiny_args(tiny_model, total, "--model.export_dir", tmp_path / "straight"), cwd=tmp_path)
    assert_same_update(tiny_model, tmp_path / "straight", tmp_path / "resumed")


def test_the_paper_scale_fsdp_config_parses(tmp_path):
    """configs/qwen3_8b_fsdp.yaml cannot run here (16 GPUs); its keys and values must still be valid."""
    printed = mopd("fit", "--config", ROOT / "configs" / "qwen3_8b_fsdp.yaml", "--print_config", cwd=tmp_path).stdout
    assert "ModelParallelStrategy" in printed and "backend: vllm" in printed and "num_nodes: 2" in printed


DOMAIN_CONFIGS = ["sci.yaml", "math.yaml", "code.yaml", "tool.yaml", "peer_control.yaml", "facts_learnable.yaml"]
METHODS = ["mopd", "opd", "teacher_opd", "grpo", "sft_success", "dpo", "simpo"]


@pytest.mark.parametrize("config", DOMAIN_CONFIGS)
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_every_method_runs_from_every_config_with_one_flag(tiny_model, tmp_path, config):
    """``--model.method X`` is the only change a config needs (the rest here only makes the tiny run short)."""
    from mopd_lightning.cli import main

    for method in METHODS:
        main(["fit", "--config", str(ROOT / "configs" / config), "--model.method", method,
              "--model.student", tiny_model, "--model.sampling.group_size", "2", "--model.sampling.max_new_tokens", "4",
              "--data.batch_size", "1", "--data.num_train", "2", "--trainer.max_steps", "1",
              "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / method)])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_accepted_by_the_paper_scale_config(method):
    """configs/qwen3_8b_fsdp.yaml cannot run here (16 GPUs): its model settings must still build every method."""
    import yaml
    from jsonargparse import ArgumentParser

    from mopd_lightning import MOPDModule

    parser = ArgumentParser()
    parser.add_class_arguments(MOPDModule, "model")
    settings = yaml.safe_load((ROOT / "configs" / "qwen3_8b_fsdp.yaml").read_text())["model"]
    module = parser.instantiate_classes(parser.parse_object({"model": {**settings, "method": method}})).model
    assert module.method.name == method and module.student is None  # nothing loaded


def test_a_bad_setting_is_one_line_and_exit_status_2(tiny_model, tmp_path):
    result = mopd(*tiny_args(tiny_model, 1, "--model.grpo.weight", "2"), cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "mopd: error: model.grpo.weight: is 2.0; must lie in [0, 1]"


@pytest.mark.parametrize("setting,value,why", [
    ("model.student", "/path/that/does/not/exist", "(no such folder)"),
    ("model.student", "someorg/somemodel", "(We couldn't connect to 'https://huggingface.co'"),
    ("model.teacher.path", "./not-a-checkpoint", "(no such folder)"),
])
def test_a_model_that_is_not_there_is_one_line_naming_the_setting(tiny_model, tmp_path, setting, value, why):
    extra = ["--model.teacher.kind", "external"] if setting == "model.teacher.path" else []
    result = subprocess.run([sys.executable, "-m", "mopd_lightning.cli", *map(str, tiny_args(tiny_model, 1, *extra)),
                             f"--{setting}", value], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"mopd: error: {setting}: {value!r} is neither an embedded model (demo, qwen-coder-0.5b), "
                           "an existing folder, nor a hub model reachable from here ") and why in line


@pytest.mark.parametrize("content,message", [
    (b'{"type": "true_or_false", "question": "Is ice water?", "answer": "Yes"}\n{"question": oops}\n',
     "bad.jsonl:2: not valid JSON"),
    (b'{"type": "true_or_false", "question": "Caf\xe9?", "answer": "Yes"}\n', "bad.jsonl:1: not UTF-8 text (byte 0xe9"),
])
def test_bad_data_is_one_line_naming_the_file_and_row(tiny_model, tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    result = mopd(*tiny_args(tiny_model, 1, "--data.train", tmp_path / "bad.jsonl"), cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
