"""Who plays which role: the teacher and the initial student run with the weights the settings name, for every
combination of teacher kind x LoRA x method, and every pass that only reads is deterministic (no dropout)."""

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from mopd_lightning import MOPDModule
from mopd_lightning.config import ConfigError, GRPOConfig, LoRAConfig, OptimConfig, SamplingConfig, TeacherConfig
from mopd_lightning.lora import STUDENT, TEACHER, adapter, adapter_pairs
from mopd_lightning.methods import METHODS
from mopd_lightning.roles import Weights, resolve_roles
from mopd_lightning.teacher import ema_update
from tiny import build_tiny_model

from test_step import examples, run

KINDS = ("ema", "self", "frozen", "external", "trust_region")
SEQUENCES = {0: [5, 9, 14, 3, 7, 21, 40], 1: [8, 2, 30, 11, 6]}
LENGTHS = {0: 3, 1: 2}


@pytest.fixture(scope="module")
def external_model(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-external"), seed=7))


def settings(kind, method, lora, external_model, kl_coef=0.0, dropout=0.0):
    teacher = TeacherConfig(kind=kind, path=external_model if kind == "external" else None, mix=0.3)
    return dict(method=method, teacher=teacher, lora=LoRAConfig(enabled=lora, rank=4, dropout=dropout),
                grpo=GRPOConfig(kl_coef=kl_coef), sampling=SamplingConfig(group_size=4, max_new_tokens=8),
                optim=OptimConfig(lr=1e-2, warmup_steps=0))


def built(tiny_model, **kwargs):
    module = MOPDModule(student=tiny_model, **kwargs)
    module.setup("fit")
    module.configure_model()
    return module


@pytest.mark.parametrize("lora", [False, True])
def test_the_table_for_every_teacher_kind_and_method(lora):
    """The table itself, written out: with LoRA every role but an external teacher is an adapter of the student."""
    student = Weights("student", STUDENT if lora else None)
    initial = Weights("student", None) if lora else Weights("initial")
    teachers = {"self": (student,), "ema": (Weights("student", TEACHER) if lora else Weights("ema"),),
                "frozen": (initial,), "external": (Weights("external"),), "trust_region": (initial, student)}
    for kind, needs_teacher, needs_reference in itertools.product(KINDS, (True, False), (True, False)):
        roles = resolve_roles(kind, lora, needs_teacher, needs_reference)
        resolved = kind if needs_teacher else "self"  # no teacher: the live student, as the analysis reports it
        assert roles.teacher_kind == resolved and roles.teacher == teachers[resolved] and roles.student == student
        assert roles.initial == (initial if needs_reference or resolved == "trust_region" else None)
        assert roles.copies == {w.module for w in roles.teacher + (roles.initial,) if w} - {"student"}


def logits(model, weights=None):
    with torch.no_grad():
        if weights is not None:
            with adapter(model, weights):
                return {r: model(torch.tensor([ids])).logits[0, len(ids) - LENGTHS[r] - 1:-1].double()
                        for r, ids in SEQUENCES.items()}
        return {r: model(torch.tensor([ids])).logits[0, len(ids) - LENGTHS[r] - 1:-1].double()
                for r, ids in SEQUENCES.items()}


def moved_apart(module):
    """The student away from its initial weights and the EMA teacher between the two, so that every source of
    weights gives other logits."""
    with torch.no_grad():
        for p in module.student.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
        if module.teacher is not None and module.roles.teacher_kind == "ema":
            ema_update(module.teacher, module.student, 0.5)
        for teacher, student in adapter_pairs(module.student):
            teacher.lerp_(student, 0.5)


COMBINATIONS = [(kind, method, lora, kl) for kind in KINDS for method in METHODS for lora in (False, True)
                for kl in (0.0, 0.05) if kl == 0 or method in ("grpo", "mopd")]


@pytest.mark.parametrize("kind,method,lora,kl_coef", COMBINATIONS)
def test_every_role_runs_with_the_weights_it_names(tiny_model, external_model, kind, method, lora, kl_coef):
    """The teacher's logits (scored as the step scores them) are those of the student, the EMA, the initial or the
    external model as the settings say, a method without a teacher getting the live student; the initial role's
    are the initial model's. (GRPO and SFT with LoRA scored against the base, and GRPO's reference on a trust-region
    config was missing, before roles were decided in one place.)"""
    torch.manual_seed(0)
    grpo_blend = dict(grpo=GRPOConfig(kl_coef=kl_coef, weight=0.5)) if method == "mopd" and kl_coef else {}
    module = built(tiny_model, **{**settings(kind, method, lora, external_model, kl_coef), **grpo_blend})
    moved_apart(module)
    initial = logits(AutoModelForCausalLM.from_pretrained(tiny_model))
    sources = {"self": logits(module.student.eval()), "frozen": initial,
               "external": logits(AutoModelForCausalLM.from_pretrained(external_model))}
    sources["ema"] = logits(module.student, TEACHER) if lora else (logits(module.teacher) if module.teacher else None)
    sources["trust_region"] = {r: 0.7 * initial[r] + 0.3 * sources["self"][r] for r in SEQUENCES}
    module.student.train()
    expected = sources[module.roles.teacher_kind]
    assert module.roles.teacher_kind == (module.teacher_config.kind if module.method.needs_teacher else "self")
    hidden, head = module.score_teacher(SEQUENCES, LENGTHS)
    for r in SEQUENCES:
        torch.testing.assert_close(hidden[r].double() @ head.double().T, expected[r], rtol=1e-4, atol=1e-4)
    if module.roles.initial is not None:
        with module.run_as(module.roles.initial) as model:
            got = logits(model)
        for r in SEQUENCES:
            torch.testing.assert_close(got[r], initial[r], rtol=1e-4, atol=1e-4)
    assert module.student.training  # back in train mode after every pass


def test_one_frozen_copy_serves_the_frozen_teacher_the_trust_region_and_the_reference(tiny_model, external_model):
    for kind in ("frozen", "trust_region"):
        module = built(tiny_model, **{**settings(kind, "mopd", False, external_model),
                                      "grpo": GRPOConfig(weight=0.5, kl_coef=0.05)})
        assert module.initial is not None and module.teacher is None
        assert not any(p.requires_grad for p in module.initial.parameters()) and not module.initial.training


@pytest.mark.parametrize("kind", ["ema", "self", "trust_region"])
def test_teacher_passes_are_deterministic_under_lora_dropout(tiny_model, external_model, kind):
    """LoRA dropout is for the student's training pass: the teacher's targets (and its reference) are not random."""
    module = built(tiny_model, **settings(kind, "mopd", True, external_model, dropout=0.5))
    moved_apart(module)
    first, _ = module.score_teacher(SEQUENCES, LENGTHS)
    second, _ = module.score_teacher(SEQUENCES, LENGTHS)
    assert max(float((first[r] - second[r]).abs().max()) for r in SEQUENCES) == 0.0


def test_a_grpo_step_with_a_kl_term_on_a_trust_region_config_trains(tiny_model, external_model):
    """``--model.method grpo --model.grpo.kl_coef 0.05`` on a config whose teacher is trust_region: GRPO builds no
    teacher, and its reference is the initial model."""
    module = built(tiny_model, **settings("trust_region", "grpo", False, external_model, kl_coef=0.05))
    trainer = run(module)
    assert torch.isfinite(trainer.logged_metrics["train/loss"])


@pytest.mark.parametrize("targets,reached", [(["lm_head"], "output head"), (["embed_tokens"], "embeddings"),
                                             (["q_proj", "lm_head"], "output head")])
def test_lora_on_the_head_or_the_embeddings_is_refused_naming_the_setting(tiny_model, targets, reached):
    module = MOPDModule(student=tiny_model, lora=LoRAConfig(enabled=True, rank=4, target_modules=targets))
    module.setup("fit")
    with pytest.raises(ConfigError, match=f"model.lora.target_modules: .* on the {reached}"):
        module.configure_model()


def test_lora_settings_while_lora_is_off_are_named_in_a_warning(caplog):
    with caplog.at_level("WARNING"):
        LoRAConfig(rank=8)
    assert "model.lora.rank set but model.lora.enabled is false" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        LoRAConfig(enabled=True, rank=8)
        LoRAConfig()
    assert caplog.text == ""


def test_a_lora_trust_region_mixes_hidden_states_on_the_one_base_head(tiny_model, external_model):
    """Both sides of a LoRA trust region read the frozen base head: no joined (V, 2H) head, the same logits."""
    module = built(tiny_model, **settings("trust_region", "mopd", True, external_model))
    moved_apart(module)
    hidden, head = module.score_teacher(SEQUENCES, LENGTHS)
    assert head.data_ptr() == module.student.get_output_embeddings().weight.data_ptr()
    assert head.shape[1] == hidden[0].shape[1] == module.student.config.hidden_size


def test_the_teacher_head_is_copied_only_where_it_changes_between_updates(tiny_model, external_model):
    """With several updates per batch: the EMA's and a full student's head move, a LoRA student's base head and a
    frozen copy's do not."""
    for kind, lora, copied in [("ema", False, True), ("self", False, True), ("ema", True, False),
                               ("self", True, False), ("frozen", False, False), ("external", False, False)]:
        module = built(tiny_model, **{**settings(kind, "mopd", lora, external_model),
                                      "optim": OptimConfig(updates_per_batch=2)})
        _, head = module.score_teacher(SEQUENCES, LENGTHS)
        with module.run_as(module.roles.teacher[0]) as model:
            live = model.get_output_embeddings().weight
        assert (head.data_ptr() != live.data_ptr()) == copied, (kind, lora)


def test_sampling_is_deterministic_under_lora_dropout(tiny_model, external_model):
    module = built(tiny_model, **settings("ema", "mopd", True, external_model, dropout=0.5))
    moved_apart(module)
    batch = examples(2)
    first, second = module.sample(batch, "train", 4, 1.0), module.sample(batch, "train", 4, 1.0)
    assert first.response_ids == second.response_ids and first.entropy == second.entropy


@pytest.mark.parametrize("kind,method,old_name", [("frozen", "mopd", "teacher."), ("trust_region", "mopd", "teacher."),
                                                  ("ema", "grpo", "reference.")])
def test_a_checkpoint_from_before_the_roles_table_loads(tiny_model, external_model, kind, method, old_name):
    """The frozen initial student was saved as ``teacher`` (frozen, trust region) or ``reference`` (GRPO's KL)."""
    module = built(tiny_model, **settings(kind, method, False, external_model, kl_coef=0.05))
    old = {(old_name + k[len("initial."):] if k.startswith("initial.") else k): v
           for k, v in module.state_dict().items()}
    checkpoint = {"state_dict": dict(old)}
    module.on_load_checkpoint(checkpoint)
    assert checkpoint["state_dict"].keys() == module.state_dict().keys()
    module.load_state_dict(checkpoint["state_dict"])
