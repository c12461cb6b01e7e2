"""Every method's objective against a direct float64 formula, and every method through a real Trainer step."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from test_step import examples, run, snapshot
from torch.utils.data import DataLoader

from mopd_lightning import MOPDModule
from mopd_lightning.config import ConfigError, GRPOConfig, LossConfig, OptimConfig, SamplingConfig, TeacherConfig
from mopd_lightning.data.datamodule import PromptStream
from mopd_lightning.objectives import (ClippedPolicyGradient, Distillation, MicroBatch, SuccessLikelihood,
                                       TrainingSignal, group_advantages)
from mopd_lightning.rewards import VERIFIERS, Score
from mopd_lightning.rollouts import Rollouts


def make(tiny_model, method="mopd", **kwargs):
    kwargs.setdefault("sampling", SamplingConfig(group_size=4, max_new_tokens=12))
    kwargs.setdefault("optim", OptimConfig(lr=1e-2, grad_clip=0.0, warmup_steps=0))
    module = MOPDModule(student=tiny_model, method=method, **kwargs)
    module.setup("fit")
    module.configure_model()
    return module


def verified(rewards, groups):
    n = len(rewards)
    rollouts = Rollouts(groups, [[1]] * n, [[2]] * n, [""] * n, [True] * n)
    rollouts.record_scores([Score(r) for r in rewards], 0.5)
    return rollouts


# -- objectives on their own --------------------------------------------------------------------------------
def test_group_advantages_by_hand():
    rollouts = verified([1, 0, 0, 1, 0, 0, 0, 0, 1, 0.5, 0, 0.25], [0] * 4 + [1] * 4 + [2] * 4)
    scaled = group_advantages(rollouts, GRPOConfig())
    a = 0.5 / ((4 * 0.5 ** 2 / 3) ** 0.5 + 1e-4)  # |r - mean| over the sample standard deviation of [1, 0, 0, 1]
    assert scaled[:4] == pytest.approx([a, -a, -a, a])
    assert scaled[4:8] == [0.0] * 4  # a group without contrast gives no signal
    rewards = torch.tensor([1, 0.5, 0, 0.25], dtype=torch.float64)
    assert scaled[8:] == pytest.approx(((rewards - rewards.mean()) / (rewards.std() + 1e-4)).tolist())
    assert group_advantages(rollouts, GRPOConfig(scale_rewards=False))[8:] == pytest.approx(
        (rewards - rewards.mean()).tolist())


def micro_batch(seed=0, tokens=10, hidden=8, vocab=23):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=generator, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=generator, requires_grad=True)
    ids = torch.randint(0, vocab, (tokens,), generator=generator)
    return MicroBatch([0, 1, 2], h, w, ids, [3, 4, 3])


def reference_logp(batch):
    logits = batch.hidden.double() @ batch.weight.double().T
    return logits.log_softmax(-1).gather(-1, batch.tokens[:, None])[:, 0]


def grads(loss, batch):
    return torch.autograd.grad(loss, [batch.hidden, batch.weight])


@pytest.mark.parametrize("kl_coef", [0.0, 0.3])
def test_clipped_policy_gradient_matches_the_formula(kl_coef):
    batch = micro_batch()
    shift = torch.tensor([0.5, -0.5, 0.0, 0.1, -0.1, 0.3, -0.3, 0.05, 0.0, 0.4])  # ratios inside and outside the clip
    batch.old_logp = batch.current_logp() + shift
    signal = TrainingSignal(advantages=[1.5, -0.7, 0.2],
                            reference_logp={r: torch.randn(n, generator=torch.Generator().manual_seed(r)) - 3
                                            for r, n in zip(batch.rows, batch.lengths)})
    config = GRPOConfig(clip_eps=0.2, kl_coef=kl_coef)
    got = ClippedPolicyGradient(config).loss_sum(batch, signal)

    logp = reference_logp(batch)
    advantage = torch.tensor([1.5] * 3 + [-0.7] * 4 + [0.2] * 3, dtype=torch.float64)
    ratio = (logp - batch.old_logp.double()).exp()
    expected = -torch.minimum(ratio * advantage, ratio.clamp(0.8, 1.2) * advantage)
    gap = torch.cat([signal.reference_logp[r] for r in batch.rows]).double() - logp
    expected = (expected + kl_coef * (gap.exp() - gap - 1)).sum()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads(got, batch), grads(expected, batch)):
        torch.testing.assert_close(g.double(), e.double(), rtol=1e-4, atol=1e-6)


def test_first_ratio_is_one_and_gives_the_plain_policy_gradient():
    batch = micro_batch(seed=1)
    batch.old_logp = batch.current_logp()
    signal = TrainingSignal(advantages=[2.0, -1.0, 0.5])
    got = ClippedPolicyGradient(GRPOConfig()).loss_sum(batch, signal)
    advantage = torch.tensor([2.0] * 3 + [-1.0] * 4 + [0.5] * 3, dtype=torch.float64)
    expected = -(advantage * reference_logp(batch)).sum()  # REINFORCE with the group advantage
    for g, e in zip(grads(got, batch), grads(expected, batch)):
        torch.testing.assert_close(g.double(), e.double(), rtol=1e-4, atol=1e-6)


def test_success_likelihood_is_the_token_nll():
    batch = micro_batch(seed=2)
    got = SuccessLikelihood().loss_sum(batch, TrainingSignal())
    expected = torch.nn.functional.cross_entropy(batch.hidden.double() @ batch.weight.double().T, batch.tokens,
                                                 reduction="sum")
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads(got, batch), grads(expected, batch)):
        torch.testing.assert_close(g.double(), e.double(), rtol=1e-4, atol=1e-6)


def test_distillation_objective_with_importance_weights():
    from mopd_kernels.reference import generalized_jsd_reference

    batch = micro_batch(seed=3)
    teacher = torch.randn(10, 8, generator=torch.Generator().manual_seed(9))
    signal = TrainingSignal(teacher_hidden=dict(zip(batch.rows, teacher.split(batch.lengths))),
                            teacher_weight=batch.weight.detach() * 0.5)
    batch.old_logp = batch.current_logp() - torch.linspace(-1, 1, 10)
    config = LossConfig(alpha=0.3, is_clip=1.5, backend="torch")
    got = Distillation(config).loss_sum(batch, signal)
    weights = (reference_logp(batch).detach() - batch.old_logp.double()).exp().clamp(max=1.5)
    per_token = generalized_jsd_reference(batch.hidden.double() @ batch.weight.double().T,
                                          teacher.double() @ signal.teacher_weight.double().T, alpha=0.3,
                                          reduction="none")
    torch.testing.assert_close(got.double(), (weights * per_token).sum(), rtol=1e-5, atol=1e-7)


def test_distillation_on_the_answer_alone_is_the_divergence_of_its_tokens():
    """``loss.tokens: answer``: the divergence on the answer's tokens only, and their count as the mean's divisor."""
    from mopd_kernels.reference import generalized_jsd_reference

    batch = micro_batch(seed=4)
    teacher = torch.randn(10, 8, generator=torch.Generator().manual_seed(5))
    positions = {row: [k for k in range(n) if (k + row) % 3 == 0] for row, n in zip(batch.rows, batch.lengths)}
    signal = TrainingSignal(teacher_hidden=dict(zip(batch.rows, teacher.split(batch.lengths))),
                            teacher_weight=batch.weight.detach() * 0.5, answer_positions=positions)
    objective = Distillation(LossConfig(tokens="answer", backend="torch"))
    per_token = generalized_jsd_reference(batch.hidden.double() @ batch.weight.double().T,
                                          teacher.double() @ signal.teacher_weight.double().T, reduction="none")
    starts = [sum(batch.lengths[:i]) for i in range(len(batch.rows))]
    chosen = [start + k for start, row in zip(starts, batch.rows) for k in positions[row]]
    torch.testing.assert_close(objective.loss_sum(batch, signal).double(), per_token[chosen].sum(), rtol=1e-5,
                               atol=1e-7)
    part = batch.select(batch.rows[1:])  # the positions follow their rows into a selection
    part_chosen = [starts[1 + i] + k for i, row in enumerate(part.rows) for k in positions[row]]
    torch.testing.assert_close(objective.loss_sum(part, signal).double(), per_token[part_chosen].sum(), rtol=1e-5,
                               atol=1e-7)
    assert objective.tokens(None, signal, batch.rows) == len(chosen)


def test_distillation_on_the_answer_trains_only_rollouts_with_one(tiny_model, monkeypatch):
    from mopd_lightning.rewards.registry import ANSWER_SPANS

    monkeypatch.setitem(ANSWER_SPANS, "parity", lambda text, strict, truth: (0, 2) if len(text) % 3 else None)
    module = make(tiny_model, "mopd", loss=LossConfig(tokens="answer"))
    batch = examples(2)
    rollouts = module.sample(batch, "train", 4, 1.0)
    module.verify(batch, rollouts)
    signal = module.training_signal(batch, rollouts)
    active = [r for r, c in enumerate(signal.contexts) if c.active]
    assert active and all(signal.answer_positions[r] for r in active)
    assert all(len(rollouts.response_text[r]) % 3 for r in active)  # the others read no answer: no signal
    assert all(0 in signal.answer_positions[r] for r in active)  # the span's first characters: the first token
    before = snapshot(module.student)
    trainer = run(module)
    assert torch.isfinite(trainer.logged_metrics["train/loss"])
    assert any(not torch.equal(before[k], v) for k, v in module.student.state_dict().items())


def test_distillation_on_the_answer_refuses_a_domain_without_an_answer_span(tiny_model):
    """A domain whose verifier names no answer span would train nothing, step after step: refused, by name."""
    module = make(tiny_model, "mopd", loss=LossConfig(tokens="answer"))
    batch = examples(2)  # the "parity" test domain, which has no span
    rollouts = module.sample(batch, "train", 4, 1.0)
    module.verify(batch, rollouts)
    with pytest.raises(ConfigError, match="model.loss.tokens: .* domain parity names none"):
        module.training_signal(batch, rollouts)


def test_micro_batch_select_keeps_rows_and_their_tokens():
    batch = micro_batch()
    batch.old_logp = batch.current_logp()
    part = batch.select([0, 2])
    assert part.rows == [0, 2] and part.lengths == [3, 3]
    torch.testing.assert_close(part.tokens, torch.cat([batch.tokens[:3], batch.tokens[7:]]))
    torch.testing.assert_close(part.logp, torch.cat([batch.logp[:3], batch.logp[7:]]))


# -- the shared update loop, method by method ---------------------------------------------------------------
class StepRecorder(pl.Callback):
    """The gradient each optimizer step applies, and the verified rollouts and signal of each step."""

    def __init__(self, module):
        self.grads, self.steps = [], []
        original = module.training_signal

        def recording(batch, rollouts):
            signal = original(batch, rollouts)
            self.steps.append((rollouts, signal))
            return signal

        module.training_signal = recording

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in module.student.named_parameters() if p.grad is not None})


def direct_logprobs(model, rollouts, rows, temperature=1.0):
    """Float64 log-probabilities of each row's response tokens from a plain forward pass (no padding)."""
    out = []
    for r in rows:
        ids = torch.tensor([rollouts.prompt_ids[r] + rollouts.response_ids[r]])
        logits = (model(input_ids=ids).logits[0].double() / temperature).log_softmax(-1)
        n = len(rollouts.response_ids[r])
        positions = torch.arange(ids.shape[1] - n - 1, ids.shape[1] - 1)
        out.append(logits[positions, torch.tensor(rollouts.response_ids[r])])
    return out


def expected_gradient(initial, loss_fn):
    model = copy.deepcopy(initial).train()
    model.zero_grad()
    loss_fn(model).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradient(got, expected):
    assert got.keys() == expected.keys() and got
    for name in got:
        torch.testing.assert_close(got[name].double(), expected[name].double(), rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_grpo_step_gradient_is_the_token_mean_policy_gradient(tiny_model, temperature):
    """At the sampling temperature: the policy whose gradient is taken is the one the rollouts came from."""
    module = make(tiny_model, "grpo", optim=OptimConfig(lr=1e-2, grad_clip=0.0, max_tokens_per_micro_batch=64),
                  sampling=SamplingConfig(group_size=4, max_new_tokens=12, temperature=temperature))
    initial = copy.deepcopy(module.student)
    recorder = StepRecorder(module)
    run(module, callbacks=[recorder])
    (rollouts, signal), = recorder.steps
    assert signal.contexts is None and module.teacher is None  # no teacher pass at all
    assert any(a != 0 for a in signal.advantages), "the parity verifier should give mixed groups"
    total = rollouts.tokens(range(len(rollouts)))  # token mean over every rollout, zero advantages included

    def loss(model):
        logp = direct_logprobs(model, rollouts, range(len(rollouts)), temperature)
        return -sum(a * lp.sum() for a, lp in zip(signal.advantages, logp)) / total

    assert_same_gradient(recorder.grads[0], expected_gradient(initial, loss))


def test_sft_success_step_gradient_is_the_success_token_nll(tiny_model):
    module = make(tiny_model, "sft_success")
    initial = copy.deepcopy(module.student)
    recorder = StepRecorder(module)
    run(module, callbacks=[recorder])
    (rollouts, _), = recorder.steps
    successes = [r for r, ok in enumerate(rollouts.success) if ok]
    assert successes and len(successes) < len(rollouts)

    def loss(model):
        return -sum(lp.sum() for lp in direct_logprobs(model, rollouts, successes)) / rollouts.tokens(successes)

    assert_same_gradient(recorder.grads[0], expected_gradient(initial, loss))


def test_blend_is_the_weighted_sum_of_distillation_and_grpo(tiny_model):
    def gradient(weight):
        module = make(tiny_model, "mopd", grpo=GRPOConfig(weight=weight))
        recorder = StepRecorder(module)
        run(module, callbacks=[recorder])
        return recorder.grads[0], module

    distill, pure = gradient(0.0)
    grpo, only_grpo = gradient(1.0)
    blend, blended = gradient(0.3)
    assert [o.name for _, o in pure.method.objectives] == ["distill"]
    assert [o.name for _, o in only_grpo.method.objectives] == ["grpo"] and only_grpo.teacher is None
    assert [(w, o.name) for w, o in blended.method.objectives] == [(0.7, "distill"), (0.3, "grpo")]
    for name in blend:
        torch.testing.assert_close(blend[name], 0.7 * distill[name] + 0.3 * grpo[name], rtol=1e-4, atol=1e-8)


def test_opd_is_one_success_peer_and_teacher_opd_sees_the_plain_prompt(tiny_model):
    assert (make(tiny_model, "opd").peers.n_success, make(tiny_model, "opd").peers.n_failure) == (1, 0)
    module = make(tiny_model, "teacher_opd", teacher=TeacherConfig(kind="frozen"))
    recorder = StepRecorder(module)
    trainer = run(module, callbacks=[recorder])
    (rollouts, signal), = recorder.steps
    assert all(c.active and c.prompt_ids == p for c, p in zip(signal.contexts, rollouts.prompt_ids))
    # The frozen teacher on the same prompt is the student itself before the first update: nothing to learn yet.
    assert float(trainer.logged_metrics["train/loss"]) == pytest.approx(0.0, abs=1e-6)


def test_an_unknown_method_names_the_field(tiny_model):
    with pytest.raises(ValueError, match=r"model\.method"):
        MOPDModule(student=tiny_model, method="imitation")


def test_switching_method_adapts_what_a_config_set_for_another_and_says_so(tiny_model, caplog):
    """``--model.method X`` is the only change a user needs: an EMA teacher becomes teacher_opd's frozen one, a
    GRPO blend is not used by grpo or sft_success; each change is logged."""
    with caplog.at_level("INFO", logger="mopd_lightning.methods"):
        teacher_opd = MOPDModule(student=tiny_model, method="teacher_opd", teacher=TeacherConfig(kind="ema"))
        grpo = MOPDModule(student=tiny_model, method="grpo", grpo=GRPOConfig(weight=0.5))
    assert teacher_opd.teacher_config.kind == "frozen" and teacher_opd.peers.context == "none"
    assert [(w, o.name) for w, o in grpo.method.objectives] == [(1.0, "grpo")]
    assert "sets model.teacher kind=frozen" in caplog.text and "model.grpo.weight 0.5" in caplog.text


SAME_LOGS = ["train/reward", "train/success_rate", "train/mixed_group_fraction", "train/active_fraction",
             "train/loss", "train/entropy", "train/response_len", "train/finished_fraction", "train/grad_norm",
             "time/sample_s", "time/verify_s", "time/teacher_s", "time/student_s", "throughput/tokens_per_s"]


@pytest.mark.parametrize("method,kwargs", [
    ("mopd", {}), ("opd", {}), ("teacher_opd", {"teacher": TeacherConfig(kind="frozen")}), ("grpo", {}),
    ("grpo", {"grpo": GRPOConfig(kl_coef=0.1), "optim": OptimConfig(lr=1e-2, updates_per_batch=2)}),
    ("sft_success", {}), ("mopd", {"grpo": GRPOConfig(weight=0.5)}),
])
def test_every_method_trains_and_logs_the_same_metrics(tiny_model, method, kwargs):
    module = make(tiny_model, method, **kwargs)
    before = snapshot(module.student)
    trainer = run(module, steps=2, n=4)
    logged = trainer.logged_metrics
    for key in SAME_LOGS:
        assert key in logged and torch.isfinite(logged[key]), key
    assert trainer.global_step == 2 and module.rollout_batches == 2  # a step is a batch, however many updates
    after = snapshot(module.student)
    assert any(not torch.equal(before[k], after[k]) for k in before), "the student did not change"
    assert (module.initial is not None) == (module.grpo.kl_coef > 0 or module.roles.teacher_kind == "frozen")


def test_a_batch_without_signal_changes_nothing_but_counts_as_a_step(tiny_model, monkeypatch):
    monkeypatch.setitem(VERIFIERS, "never", lambda strict, sandbox: lambda response, ground_truth: Score(0.0))

    module = make(tiny_model, "grpo")
    before = snapshot(module.student)
    data = examples(2)
    for e in data:
        e.verifier = "never"
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(PromptStream(data, 2, seed=0, shuffle=False), batch_size=None))
    assert trainer.global_step == 1
    assert float(trainer.logged_metrics["train/active_fraction"]) == 0.0
    for name, value in module.student.state_dict().items():
        assert torch.equal(value, before[name])


def test_the_sandbox_isolation_level_is_in_the_run_metrics(tiny_model):
    from mopd_lightning.execution import isolation

    module = make(tiny_model, "grpo")
    data = examples(2)
    for e in data:
        e.verifier, e.ground_truth = "code", {"kind": "stdio", "tests": [{"input": "", "output": "1"}]}
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(PromptStream(data, 2, seed=0, shuffle=False), batch_size=None))
    assert float(trainer.logged_metrics["train/sandbox_isolation"]) == isolation().rank
