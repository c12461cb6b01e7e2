"""Dynamic sampling: only groups the method learns from are trained on (distillation: both outcomes; GRPO: rewards
that differ); extra prompts are drawn per rank, from the seed, so runs, ranks and resumed runs draw the same."""

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from mopd_lightning import MOPDModule
from mopd_lightning.config import (ConfigError, DynamicSamplingConfig, GRPOConfig, LossConfig, OptimConfig, PeerConfig,
                                   SamplingConfig, TeacherConfig)
from mopd_lightning.data.datamodule import PromptDataModule
from mopd_lightning.data.example import Example
from mopd_lightning.dynamic_sampling import check_enough_prompts, keep_useful_groups
from mopd_lightning.methods import build_method
from mopd_lightning.rewards import Score
from mopd_lightning.rollouts import Rollouts
from mopd_lightning.timing import PhaseTimer

from test_step import examples  # noqa: F401 - registers the parity verifier the tiny-model runs use


def prompts(n):
    return [Example(f"p{i}", [{"role": "user", "content": f"Question {i}"}], "", "scripted") for i in range(n)]


def datamodule(train, batch_size=2, rank=None):
    data = PromptDataModule(val=None, batch_size=batch_size)
    data.datasets["train"] = train
    if rank is not None:
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank)
    return data


class ScriptedModule:
    """What ``keep_useful_groups`` uses of the module: rollouts whose rewards are scripted per prompt."""

    def __init__(self, outcomes, data, group_size=2, method="mopd", grpo_weight=0.0):
        self.outcomes, self.seed, self.rollout_batches = outcomes, 0, 7
        self.method = build_method(method, PeerConfig(), TeacherConfig(), LossConfig(), GRPOConfig(weight=grpo_weight))
        self.sampling = SamplingConfig(group_size=group_size)
        self.trainer = SimpleNamespace(datamodule=data)
        self.sampled = []

    def all_reduce(self, value):
        return value

    def sample(self, batch, stage, group_size, temperature, round=0):
        self.sampled.append([e.id for e in batch])
        rows = [(g, e) for g, e in enumerate(batch) for _ in range(group_size)]
        return Rollouts([g for g, _ in rows], [[1]] * len(rows), [[2, k] for k in range(len(rows))],
                        [e.id for _, e in rows], [True] * len(rows))

    def verify(self, batch, rollouts):
        rewards = [self.outcomes[batch[g].id][k % self.sampling.group_size] for k, g in enumerate(rollouts.group)]
        rollouts.record_scores([Score(r) for r in rewards], 0.5)


MIXED = {1, 4, 7, 8}


def scripted(n=12):
    return {f"p{i}": ([1.0, 0.0] if i in MIXED else [float(i % 3 == 0)] * 2) for i in range(n)}


def test_from_groups_takes_whole_groups_in_the_order_given():
    a = Rollouts([0, 0, 1, 1], [[1]] * 4, [[10], [11], [12], [13]], ["a", "b", "c", "d"], [True] * 4,
                 reward=[1.0, 0.0, 0.0, 0.0], success=[True, False, False, False], feedback=[None] * 4)
    b = Rollouts([0, 0], [[2]] * 2, [[20], [21]], ["e", "f"], [False, True],
                 reward=[0.0, 1.0], success=[False, True], feedback=["x", None])
    joined = Rollouts.from_groups([(b, 0), (a, 0)])
    assert joined.group == [0, 0, 1, 1]
    assert joined.response_ids == [[20], [21], [10], [11]]
    assert joined.success == [False, True, True, False] and joined.feedback == ["x", None, None, None]
    assert joined.entropy == [] and joined.sample_logp == []  # not sampled: stays empty
    assert joined.mixed_group_fraction == 1.0


def test_only_groups_with_both_outcomes_are_kept_drawing_extra_prompts():
    train = prompts(12)
    module = ScriptedModule(scripted(), datamodule(train))
    batch = [train[0], train[1]]  # one mixed group
    kept, rollouts, stats = keep_useful_groups(module, batch, module_sample(module, batch),
                                              DynamicSamplingConfig(enabled=True, max_rounds=10), PhaseTimer())
    assert len(kept) == 2 and {e.id for e in kept} <= {f"p{i}" for i in MIXED}
    assert kept[0].id == "p1"  # the batch's own mixed group first, then in drawing order
    assert all(rollouts.is_mixed(members) for members in rollouts.groups)
    assert [rollouts.response_text[m[0]] for m in rollouts.groups] == [e.id for e in kept]
    drawn = [i for ids in module.sampled for i in ids]
    assert len(drawn) == len(set(drawn)), "a prompt was drawn twice in one step"
    assert stats["dynamic_groups_sampled"] == len(drawn) and stats["dynamic_groups_kept"] == 2
    assert stats["dynamic_groups_dropped"] == len(drawn) - 2
    assert stats["dynamic_rounds"] == len(module.sampled) - 1 and stats["dynamic_short"] == 0.0


def test_a_step_that_runs_out_of_rounds_trains_on_what_it_found_or_on_its_batch():
    train = prompts(12)
    module = ScriptedModule(scripted(), datamodule(train))
    config = DynamicSamplingConfig(enabled=True, max_rounds=0)
    kept, rollouts, stats = keep_useful_groups(module, train[:2], module_sample(module, train[:2]), config,
                                              PhaseTimer())
    assert [e.id for e in kept] == ["p1"] and len(rollouts) == 2
    assert stats["dynamic_short"] == 1.0 and stats["dynamic_groups_dropped"] == 1.0
    batch = [train[0], train[3]]  # neither mixed
    first = module_sample(module, batch)
    kept, rollouts, stats = keep_useful_groups(module, batch, first, config, PhaseTimer())
    assert kept == batch and rollouts is first
    assert stats["dynamic_short"] == 1.0 and stats["dynamic_groups_kept"] == 2.0


GRADED = {"spread, no success": [0.0, 0.2, 0.4, 0.0], "spread, all succeed": [0.5, 1.0, 0.75, 1.0],
          "both outcomes": [1.0, 0.0, 0.0, 0.0], "all fail alike": [0.0] * 4, "all succeed alike": [1.0] * 4}


@pytest.mark.parametrize("method,grpo_weight,kept", [
    ("grpo", 0.0, ["spread, no success", "spread, all succeed", "both outcomes"]),
    ("mopd", 0.0, ["both outcomes"]),
    ("mopd", 0.5, ["spread, no success", "spread, all succeed", "both outcomes"]),  # the blend's GRPO part
    ("sft_success", 0.0, ["spread, all succeed", "both outcomes", "all succeed alike"]),
])
def test_each_method_keeps_the_groups_it_learns_from(method, grpo_weight, kept):
    """Graded rewards (code's share of tests passed) give GRPO non-zero advantages without a success and a failure;
    distillation needs both outcomes to show; SFT a success."""
    train = [Example(name, [{"role": "user", "content": name}], "", "scripted") for name in GRADED]
    module = ScriptedModule(GRADED, datamodule(train), group_size=4, method=method, grpo_weight=grpo_weight)
    batch, _, stats = keep_useful_groups(module, train, module_sample(module, train),
                                         DynamicSamplingConfig(enabled=True, max_rounds=0), PhaseTimer())
    assert [e.id for e in batch] == kept and stats["dynamic_groups_kept"] == len(kept)


def module_sample(module, batch):
    rollouts = module.sample(batch, "train", module.sampling.group_size, 1.0)
    module.verify(batch, rollouts)
    module.sampled.clear()
    module.sampled.append([e.id for e in batch])
    return rollouts


def test_extra_prompts_come_from_the_seed_and_each_rank_draws_from_its_own_share():
    train = prompts(20)
    ranks = [datamodule(train, rank=r) for r in (0, 1)]
    draws = [data.draw_prompts(6, "0:dynamic:3:1", set()) for data in ranks]
    assert not {e.id for e in draws[0]} & {e.id for e in draws[1]}
    assert [e.id for e in datamodule(train, rank=0).draw_prompts(6, "0:dynamic:3:1", set())] == \
        [e.id for e in draws[0]], "the same key must draw the same prompts (a resumed run)"
    assert [e.id for e in ranks[0].draw_prompts(6, "0:dynamic:4:1", set())] != [e.id for e in draws[0]]
    excluded = {e.id for e in draws[0][:3]}
    assert not excluded & {e.id for e in ranks[0].draw_prompts(10, "0:dynamic:3:1", excluded)}


def test_too_few_prompts_for_the_rounds_is_a_config_error():
    check_enough_prompts(DynamicSamplingConfig(enabled=True, max_rounds=3), 16, 4, 1)
    with pytest.raises(ConfigError, match="model.dynamic_sampling.max_rounds"):
        check_enough_prompts(DynamicSamplingConfig(enabled=True, max_rounds=3), 16, 4, 2)


def fit(tiny_model, steps, tmp_path, ckpt_path=None):
    module = MOPDModule(student=tiny_model, sampling=SamplingConfig(group_size=4, max_new_tokens=12),
                        optim=OptimConfig(lr=1e-2), dynamic_sampling=DynamicSamplingConfig(enabled=True, max_rounds=4))
    data = PromptDataModule(val=None, batch_size=2, seed=3)
    data.datasets["train"] = examples(16)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[checkpoint], log_every_n_steps=1)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer


def test_a_dynamic_step_trains_on_mixed_groups_and_a_resumed_run_draws_the_same(tiny_model, tmp_path):
    straight, trainer = fit(tiny_model, 2, tmp_path / "straight")
    logged = trainer.logged_metrics
    assert logged["train/dynamic_groups_kept"] == 2 and logged["train/dynamic_short"] == 0
    assert logged["train/mixed_group_fraction"] == 1.0
    assert logged["train/dynamic_groups_sampled"] >= 2
    fit(tiny_model, 1, tmp_path / "first")
    resumed, _ = fit(tiny_model, 2, tmp_path / "first", ckpt_path=str(tmp_path / "first" / "last.ckpt"))
    for (name, a), b in zip(straight.student.state_dict().items(), resumed.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["mopd", "opd", "teacher_opd", "grpo"])
@pytest.mark.parametrize("self_feedback", ["never", "always", "without_success"])
@pytest.mark.parametrize("enabled", [False, True])
@pytest.mark.parametrize("blend", [0.0, 0.5])
def test_own_feedback_where_no_success_is_shown_is_refused_where_dynamic_sampling_leaves_no_such_context(
        method, self_feedback, enabled, blend):
    """Dynamic sampling keeps a distillation method's groups only when they hold a success and a failure, so every
    failure is shown a success and ``self_feedback: without_success`` would never show anything: refused there, by
    both names. With a GRPO blend (graded rewards keep groups without a success), or teacher_opd's plain prompt, it
    still shows feedback."""
    kwargs = dict(student="unused", method=method, peers=PeerConfig(self_feedback=self_feedback),
                  dynamic_sampling=DynamicSamplingConfig(enabled=enabled), grpo=GRPOConfig(weight=blend))
    refused = (enabled and self_feedback == "without_success" and method in ("mopd", "opd") and blend == 0.0)
    if refused:
        with pytest.raises(ConfigError, match="model.peers.self_feedback: without_success .*"
                                              "model.dynamic_sampling.enabled"):
            MOPDModule(**kwargs)
    else:
        MOPDModule(**kwargs)


def test_in_a_group_with_both_outcomes_no_context_shows_feedback_where_no_success_is_shown(tiny_model):
    """Why the combination above does nothing: a failure of such a group is always shown a success, and a success has
    no feedback to show."""
    from transformers import AutoTokenizer

    from mopd_lightning.peers import build_teacher_contexts

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for successes in range(1, 4):
        success = [k < successes for k in range(4)]
        rollouts = Rollouts([0] * 4, [[5]] * 4, [tokenizer.encode(f"answer {k}") for k in range(4)],
                            [f"answer {k}" for k in range(4)], [True] * 4)
        rollouts.record_scores([Score(float(ok), None if ok else "The answer B is incorrect.") for ok in success], 0.5)
        contexts = build_teacher_contexts([Example("q", [{"role": "user", "content": "Q"}], "A", "sci")], rollouts,
                                          tokenizer, PeerConfig(self_feedback="without_success"), "k")
        assert not any("your own earlier attempt" in tokenizer.decode(c.prompt_ids) for c in contexts)
