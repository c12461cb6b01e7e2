"""LoRA students: the teacher is an adapter (or the base) of the same model, every method trains, resume is exact,
export gives merged weights and the adapter alone."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

from mopd_lightning import MOPDModule
from mopd_lightning.config import (ConfigError, GRPOConfig, LoRAConfig, OptimConfig, SamplingConfig,
                                   TeacherConfig)
from mopd_lightning.data.datamodule import PromptDataModule
from mopd_lightning.lora import STUDENT, TEACHER, adapter_pairs
from mopd_lightning.roles import Weights

from test_step import examples, run

LORA = LoRAConfig(enabled=True, rank=4, alpha=8.0)


def make(tiny_model, **kwargs):
    kwargs.setdefault("sampling", SamplingConfig(group_size=4, max_new_tokens=12))
    kwargs.setdefault("optim", OptimConfig(lr=1e-2, warmup_steps=0))
    module = MOPDModule(student=tiny_model, lora=LORA, **kwargs)
    module.setup("fit")
    module.configure_model()
    return module


def adapters(model, name):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if f".{name}." in k and "lora_" in k}


def base(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


class AdapterHistory(pl.Callback):
    """The student's adapter after every step."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps.append(adapters(module.student, STUDENT))


def test_the_ema_teacher_is_an_ema_of_the_student_adapter_on_the_same_base(tiny_model):
    module = make(tiny_model)
    assert module.teacher is None, "with LoRA the teacher must not be a second model"
    assert [p.requires_grad for p in module.student.parameters()].count(True) == len(adapters(module.student, STUDENT))
    start_base, teacher = base(module.student), adapters(module.student, TEACHER)
    expected = {k.replace(f".{TEACHER}.", f".{STUDENT}."): v.double() for k, v in teacher.items()}
    assert all(torch.equal(v.float(), adapters(module.student, STUDENT)[k]) for k, v in expected.items())
    history = AdapterHistory()
    run(module, steps=3, callbacks=[history])
    rate = module.teacher_config.ema_rate
    for student in history.steps:  # teacher <- (1 - r) teacher + r student, in float64
        expected = {k: (1 - rate) * v + rate * student[k].double() for k, v in expected.items()}
    actual = adapters(module.student, TEACHER)
    for key, value in actual.items():
        torch.testing.assert_close(value.double(), expected[key.replace(f".{TEACHER}.", f".{STUDENT}.")],
                                   rtol=1e-6, atol=1e-7)
    assert not all(torch.equal(a, b) for a, b in adapter_pairs(module.student)), "the teacher lags the student"
    assert all(torch.equal(v, start_base[k]) for k, v in base(module.student).items()), "the base must stay frozen"


@pytest.mark.parametrize("method,kind", [("mopd", "ema"), ("mopd", "self"), ("mopd", "frozen"),
                                         ("mopd", "trust_region"), ("opd", "ema"), ("teacher_opd", "frozen"),
                                         ("grpo", "ema"), ("sft_success", "ema")])
def test_every_method_and_teacher_trains_the_adapter_alone(tiny_model, method, kind):
    module = make(tiny_model, method=method, teacher=TeacherConfig(kind=kind), grpo=GRPOConfig(kl_coef=0.1))
    start_base, start_adapter = base(module.student), adapters(module.student, STUDENT)
    trainer = run(module)
    assert torch.isfinite(trainer.logged_metrics["train/loss"])
    assert all(torch.equal(v, start_base[k]) for k, v in base(module.student).items())
    if method != "sft_success":  # random text rarely succeeds: SFT may have nothing to learn from
        assert any(not torch.equal(v, start_adapter[k]) for k, v in adapters(module.student, STUDENT).items())
    assert all(p.requires_grad == (f".{STUDENT}." in n and "lora_" in n) for n, p in module.student.named_parameters())


def test_the_teacher_sees_its_own_adapter_and_the_frozen_teacher_the_base(tiny_model):
    module = make(tiny_model)
    with torch.no_grad():
        for _, student in adapter_pairs(module.student):
            student.add_(0.5 * torch.randn_like(student))
    ids = torch.tensor([[5, 9, 14, 3, 7]])
    plain = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        live = module.student(ids).logits
        with module.run_as(module.roles.teacher[0]) as teacher:
            assert teacher is module.student
            as_teacher = teacher(ids).logits
        with module.run_as(Weights("student", None)) as initial:
            as_base = initial(ids).logits
        torch.testing.assert_close(as_base, plain(ids).logits)
        torch.testing.assert_close(as_teacher, plain(ids).logits)  # the teacher adapter is still the initial one
        assert (live - as_base).abs().max() > 1e-3
        torch.testing.assert_close(module.student(ids).logits, live)  # back to the student after each block


def fit(tiny_model, steps, folder, ckpt_path=None):
    module = MOPDModule(student=tiny_model, lora=LORA, sampling=SamplingConfig(group_size=4, max_new_tokens=12),
                        optim=OptimConfig(lr=1e-2))
    data = PromptDataModule(val=None, batch_size=2, seed=3)
    data.datasets["train"] = examples(8)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=1)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[checkpoint])
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


def test_resuming_a_lora_run_equals_a_straight_run(tiny_model, tmp_path):
    straight = fit(tiny_model, 3, tmp_path / "straight")
    fit(tiny_model, 2, tmp_path / "first")
    resumed = fit(tiny_model, 3, tmp_path / "first", ckpt_path=str(tmp_path / "first" / "last.ckpt"))
    for name in (STUDENT, TEACHER):
        a, b = adapters(straight.student, name), adapters(resumed.student, name)
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_export_writes_merged_weights_and_the_adapter_alone(tiny_model, tmp_path):
    from peft import PeftModel

    module = make(tiny_model)
    with torch.no_grad():
        for _, student in adapter_pairs(module.student):
            student.add_(0.5 * torch.randn_like(student))
    module.export(str(tmp_path / "out"))
    ids = torch.tensor([[5, 9, 14, 3, 7]])
    with torch.no_grad():
        expected = module.student(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)
        with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "out" /
                                                 "adapter")
        torch.testing.assert_close(with_adapter(ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert not any("lora" in name for name in merged.state_dict())


def test_lora_settings_are_checked():
    with pytest.raises(ConfigError, match="model.lora.rank"):
        LoRAConfig(enabled=True, rank=0)


def test_fsdp_on_two_processes_trains_a_lora_student_as_one_process_does(tiny_model, tmp_path):
    """LoRA under FSDP2 (two CPU processes): the EMA teacher adapter updates shard by shard, and the merged export
    gathered from the shards equals a one-process run's."""
    from safetensors.torch import load_file

    from test_cli import FSDP_ON_TWO_CPUS, mopd, tiny_args

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    common = ["--data.shuffle", "false", "--model.lora.enabled", "true", "--model.lora.rank", "4",
              "--model.export_dir"]
    mopd(*tiny_args(tiny_model, 2, *common, one / "export"), cwd=one)
    mopd(*tiny_args(tiny_model, 2, *common, two / "export", *FSDP_ON_TWO_CPUS), cwd=two)
    start = load_file(str(Path(tiny_model) / "model.safetensors"))
    first, second = (load_file(str(folder / "export" / "model.safetensors")) for folder in (one, two))
    assert first.keys() == second.keys() == start.keys()
    moved = [name for name in first if not torch.equal(first[name], start[name])]
    assert moved and all(".layers." in name and "norm" not in name for name in moved)  # adapted layers only
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=1e-4, atol=1e-5, msg=name)
    assert (one / "export" / "adapter" / "adapter_model.safetensors").exists()
    assert (two / "export" / "adapter" / "adapter_model.safetensors").exists()
