"""A full MOPD step on a tiny random Llama, through a real Lightning Trainer."""


import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from mopd_lightning import MOPDModule
from mopd_lightning.config import OptimConfig, PeerConfig, SamplingConfig, TeacherConfig
from mopd_lightning.data.datamodule import PromptStream
from mopd_lightning.data.example import Example
from mopd_lightning.rewards import VERIFIERS, Score
from mopd_lightning.scoring import output_weight


def _parity(response, ground_truth):
    """Deterministic, mixed rewards from random text: success when the response has an even length."""
    return Score(float(len(response) % 2 == 0))


VERIFIERS["parity"] = lambda strict, sandbox: _parity  # a test domain, added as users add theirs



def examples(n=4):
    return [Example(f"toy-{i}", [{"role": "user", "content": f"Question {i}: add {i} and 3."}], "", "parity")
            for i in range(n)]


def run(module, steps=1, batch_size=2, n=4, callbacks=()):
    checkpointing = any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=checkpointing,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=list(callbacks))
    loader = DataLoader(PromptStream(examples(n), batch_size, seed=0, shuffle=False), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def make(tiny_model, **kwargs):
    kwargs.setdefault("sampling", SamplingConfig(group_size=4, max_new_tokens=12))
    kwargs.setdefault("optim", OptimConfig(lr=1e-2))
    return MOPDModule(student=tiny_model, **kwargs)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_full_step_updates_student_and_ema_teacher(tiny_model):
    module = make(tiny_model)
    module.setup("fit")
    module.configure_model()
    before = snapshot(module.student)
    trainer = run(module)
    after = snapshot(module.student)
    assert any(not torch.equal(before[k], after[k]) for k in before), "the student did not change"
    rate = module.teacher_config.ema_rate
    for name, teacher_value in module.teacher.state_dict().items():
        expected = (1 - rate) * before[name] + rate * after[name]
        torch.testing.assert_close(teacher_value, expected, rtol=1e-5, atol=1e-6)
    logged = trainer.logged_metrics
    for key in ["train/reward", "train/success_rate", "train/mixed_group_fraction", "train/active_fraction",
                "train/peers_per_context", "train/teacher_prompt_len_mean", "train/teacher_prompt_len_max",
                "train/peer_truncation_fraction", "train/loss", "train/entropy", "train/response_len",
                "time/sample_s", "time/verify_s", "time/teacher_s", "time/student_s", "throughput/tokens_per_s"]:
        assert key in logged, key
    assert 0 < logged["train/mixed_group_fraction"] <= 1
    assert logged["train/loss"] > 0 and torch.isfinite(logged["train/loss"])


@pytest.mark.parametrize("kind", ["self", "frozen"])
def test_teacher_kinds(tiny_model, kind):
    module = make(tiny_model, teacher=TeacherConfig(kind=kind))
    module.setup("fit")
    module.configure_model()
    initial = snapshot(module.student)
    run(module)
    if kind == "self":
        with module.run_as(module.roles.teacher[0]) as teacher:
            assert module.teacher is None and module.initial is None and teacher is module.student
    else:
        for name, value in module.initial.state_dict().items():
            assert torch.equal(value, initial[name])


class GradientRecorder(pl.Callback):
    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.grads = {n: p.grad.clone() for n, p in module.student.named_parameters() if p.grad is not None}


def test_micro_batch_size_does_not_change_the_gradient(tiny_model):
    grads = []
    for max_tokens in (64, 100_000):
        module = make(tiny_model, optim=OptimConfig(lr=1e-2, max_tokens_per_micro_batch=max_tokens))
        recorder = GradientRecorder()
        run(module, callbacks=[recorder])
        grads.append(recorder.grads)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7)


def test_non_finite_loss_skips_the_step(tiny_model, monkeypatch):
    import mopd_lightning.objectives as objectives

    def nan_loss(student_hidden, *args, **kwargs):
        return student_hidden.sum() * float("nan")

    monkeypatch.setattr(objectives, "distillation_loss", nan_loss)
    module = make(tiny_model)
    module.setup("fit")
    module.configure_model()
    before = snapshot(module.student)
    run(module, steps=2, n=8)  # two batches, both non-finite: the run goes on
    assert module.skipped_steps == 2
    for name, value in module.student.state_dict().items():
        assert torch.equal(value, before[name])


@pytest.mark.parametrize("kind", ["self", "ema"])
def test_reused_rollouts_keep_the_teacher_head_they_were_scored_with(tiny_model, kind):
    """The second update on a batch pairs the teacher's hidden states with the head that produced them, not with
    a head the first update moved."""
    module = make(tiny_model, teacher=TeacherConfig(kind=kind, ema_rate=0.5),
                  optim=OptimConfig(lr=1e-1, updates_per_batch=2))
    scored = []
    training_signal = module.training_signal

    def keep(batch, rollouts):
        signal = training_signal(batch, rollouts)
        scored.append((signal, signal.teacher_weight.clone()))
        return signal

    module.training_signal = keep
    run(module, steps=1)
    (signal, head), = scored
    assert torch.equal(signal.teacher_weight, head)
    with module.run_as(module.roles.teacher[0]) as teacher:
        assert not torch.equal(output_weight(teacher).detach(), head)  # the live head did move


class SeenGradients(pl.Callback):
    """The gradient norm every ``on_before_optimizer_step`` sees (a gradient-monitoring callback's view)."""

    def __init__(self):
        self.norms = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grads = [p.grad.detach().float().norm() for p in module.student.parameters() if p.grad is not None]
        self.norms.append(float(torch.stack(grads).norm()))


def fp16_run(module, scaler, steps, callbacks=()):
    """CUDA's 16-mixed (autocast to float16 and a GradScaler, which Lightning gives only on CUDA: forced here)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], callbacks=list(callbacks))
    trainer.fit(module, train_dataloaders=DataLoader(PromptStream(examples(4), 2, seed=0, shuffle=False),
                                                     batch_size=None))
    return trainer


def test_16_mixed_clips_the_unscaled_gradients(tiny_model):
    """The scaler multiplies the loss by 2**16; the update clips (and logs) the gradient unscaled, as callbacks
    see it."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    module, seen = make(tiny_model, optim=OptimConfig(lr=1e-2, grad_clip=1e-3)), SeenGradients()
    module.setup("fit")
    module.configure_model()
    before = snapshot(module.student)
    trainer = fp16_run(module, scaler, 1, [seen])
    logged = float(trainer.logged_metrics["train/grad_norm"])
    assert len(seen.norms) == 1 and logged == pytest.approx(seen.norms[0], rel=1e-4)
    assert 1e-3 < logged < 100  # unscaled: a scaled norm would be about 65,536 times larger
    assert module.skipped_steps == 0 and scaler.get_scale() == 2.0 ** 16
    assert any(not torch.equal(before[k], v) for k, v in module.student.state_dict().items())


def test_16_mixed_skips_an_overflow_step_through_the_scaler(tiny_model):
    """An overflowing gradient: no weight or optimizer state moves, the scaler's own update lowers its scale, and the
    next step trains."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    module = make(tiny_model)
    module.setup("fit")
    module.configure_model()
    poisoned = []

    def overflow_once(grad):
        if not poisoned:
            poisoned.append(True)
            return grad * float("inf")
        return grad

    next(module.student.parameters()).register_hook(overflow_once)
    history = []

    class Weights(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            history.append((snapshot(pl_module.student), scaler.get_scale(), pl_module.skipped_steps))

    start = snapshot(module.student)
    fp16_run(module, scaler, 2, [Weights()])
    (first, scale_1, skipped_1), (second, scale_2, skipped_2) = history
    assert skipped_1 == 1 and all(torch.equal(start[k], v) for k, v in first.items())
    assert scale_1 == 2.0 ** 9  # the scaler saw the overflow and backed off
    assert skipped_2 == 1 and any(not torch.equal(first[k], v) for k, v in second.items())
    assert scale_2 == 2.0 ** 9


def test_every_update_is_seen_by_callbacks_and_the_first_is_logged(tiny_model):
    """With three updates per batch the logged loss and gradient norm are the first, on-policy update's (those of a
    one-update run), the means over updates are named as such, and a gradient-monitoring callback sees each update's
    gradients before clipping."""
    logged, seen = {}, {}
    for updates in (1, 3):
        torch.manual_seed(0)
        module, seen[updates] = make(tiny_model, optim=OptimConfig(lr=1e-2, updates_per_batch=updates,
                                                                  grad_clip=1e-3)), SeenGradients()
        trainer = run(module, steps=1, callbacks=[seen[updates]])
        logged[updates] = {k: float(v) for k, v in trainer.logged_metrics.items()}
    assert len(seen[1].norms) == 1 and len(seen[3].norms) == 3 and min(seen[3].norms) > 1e-3  # unclipped
    assert logged[3]["train/loss"] == pytest.approx(logged[1]["train/loss"], rel=1e-5)
    assert logged[3]["train/grad_norm"] == pytest.approx(logged[1]["train/grad_norm"], rel=1e-5)
    assert logged[3]["train/grad_norm"] == pytest.approx(seen[3].norms[0], rel=1e-4)
    assert logged[3]["train/grad_norm_mean_over_updates"] == pytest.approx(sum(seen[3].norms) / 3, rel=1e-4)
    assert logged[3]["train/loss_mean_over_updates"] != logged[3]["train/loss"]
    assert "train/loss_mean_over_updates" not in logged[1]


def test_no_peer_rollouts_are_masked(tiny_model):
    module = make(tiny_model, peers=PeerConfig(n_success=1, n_failure=0))
    module.setup("fit")
    module.configure_model()
    batch = examples(2)
    rollouts = module.sample(batch, "train", 4, 1.0)
    rollouts.record_scores([Score(1.0 if r % 4 == 0 else 0.0) for r in range(len(rollouts))], 0.5)  # one success a group
    signal = module.training_signal(batch, rollouts)
    # Only the failures can see the single success; the success itself has no success peer.
    active = [r for r, c in enumerate(signal.contexts) if c.active]
    assert active == [1, 2, 3, 5, 6, 7]
    assert set(signal.teacher_hidden) == set(active)


def test_rollouts_come_from_the_model_not_from_its_checkpoint_generation_settings(tiny_model):
    """A checkpoint's generation config (Qwen2.5-Instruct ships a repetition penalty) must not reshape the
    distribution rollouts are drawn from: greedy is the raw argmax, and the entropy recorded while sampling is
    that of the raw logits."""
    from mopd_lightning.models import load_causal_lm, load_tokenizer
    from mopd_lightning.sampling import sample_groups

    model, tokenizer = load_causal_lm(tiny_model), load_tokenizer(tiny_model)
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.no_repeat_ngram_size = 1
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello there."}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    greedy = sample_groups(model, tokenizer, [prompt], 1, [[0]], 10, temperature=0.0).response_ids[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(len(greedy)):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert greedy == ids[len(prompt):]
    sampled = sample_groups(model, tokenizer, [prompt], 2, [[1, 2]], 10, temperature=1.0)
    for r, response in enumerate(sampled.response_ids):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
        log_p = logits.log_softmax(-1)
        assert sampled.entropy[r] == pytest.approx(float(-(log_p.exp() * log_p).sum()), rel=1e-4)
    assert model.generation_config.repetition_penalty == 50.0  # the checkpoint's own settings stay its own


def test_sampling_is_reproducible_and_batch_independent(tiny_model):
    module = make(tiny_model)
    module.setup("fit")
    module.configure_model()
    batch = examples(3)
    together = module.sample(batch, "train", 4, 1.0)
    alone = module.sample(batch[1:2], "train", 4, 1.0)
    assert together.response_ids[4:8] == alone.response_ids
    assert module.sample(batch, "train", 4, 1.0).response_ids == together.response_ids


@pytest.fixture
def distillation_weights(monkeypatch):
    """The per-token weights every distillation loss of the test is given, in call order."""
    import mopd_lightning.objectives as objectives

    seen = []
    real_loss = objectives.distillation_loss

    def recording_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, weights, *rest):
        seen.append(weights.clone())
        return real_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, weights, *rest)

    monkeypatch.setattr(objectives, "distillation_loss", recording_loss)
    return seen


def test_reused_rollouts_get_clipped_importance_weights(tiny_model, distillation_weights):
    seen = distillation_weights
    module = make(tiny_model, optim=OptimConfig(lr=5e-2, updates_per_batch=2, max_tokens_per_micro_batch=100_000))
    trainer = run(module, steps=1)
    assert trainer.global_step == 1 and len(seen) == 2  # one batch (a step), two optimizer updates
    assert torch.equal(seen[0], torch.ones_like(seen[0]))  # on-policy: exactly 1
    assert not torch.equal(seen[1], seen[0]) and seen[1].max() <= module.hparams.loss.is_clip


def test_a_step_is_a_batch_of_rollouts_whatever_the_updates_on_it(tiny_model, tmp_path):
    """max_steps and checkpoints every n steps count batches of rollouts, not optimizer updates."""
    module = make(tiny_model, optim=OptimConfig(updates_per_batch=3))
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    trainer = run(module, steps=2, n=8, callbacks=[checkpoints])
    assert trainer.global_step == 2 and module.rollout_batches == 2
    optimizer = trainer.optimizers[0]
    assert {int(optimizer.state[p]["step"]) for p in module.student.parameters()} == {6}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"]


@pytest.mark.parametrize("grpo_weight", [0.0, 0.5])
def test_one_update_weighs_every_distillation_token_1_whatever_the_blend_and_the_sampler(
        tiny_model, distillation_weights, monkeypatch, grpo_weight):
    """A sampler's own log-probs (vLLM's) are not the trainer's: they are logged as the off-policy gap, never
    turned into importance weights, so the same tokens weigh the same with or without GRPO blended in."""
    import mopd_lightning.module as module_file
    from mopd_lightning.config import GRPOConfig

    real_sample = module_file.sample_groups

    def engine_like(*args, **kwargs):
        rollouts = real_sample(*args, **kwargs)
        rollouts.sample_logp = [[-1.0] * len(ids) for ids in rollouts.response_ids]  # far from the trainer's
        return rollouts

    monkeypatch.setattr(module_file, "sample_groups", engine_like)
    module = make(tiny_model, grpo=GRPOConfig(weight=grpo_weight), peers=PeerConfig(require_success=False))
    run(module, steps=1)
    assert distillation_weights and all(torch.equal(w, torch.ones_like(w)) for w in distillation_weights)


def _graded(response, ground_truth):
    """Partial credit, as code's share of tests passed: 0.25 (a failure) for an even length, else 1."""
    return Score(0.25 if len(response) % 2 == 0 else 1.0)


VERIFIERS["graded"] = lambda strict, sandbox: _graded


def test_validation_reports_mean_pass_at_k_and_greedy_counting_successes(tiny_model):
    """mean@k counts successes, as greedy accuracy and pass@k do; reward@k is the mean (partial) reward."""
    module = make(tiny_model)
    verified = []
    verify = module.verify
    module.verify = lambda batch, rollouts: (verify(batch, rollouts), verified.append(rollouts))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    graded = [Example(e.id, e.messages, e.ground_truth, "graded") for e in examples(4)]
    loader = DataLoader(graded, batch_size=2, collate_fn=lambda b: b)
    metrics = trainer.validate(module, dataloaders=loader, verbose=False)[0]
    sampled = [r for r in verified if len(r) == 8]  # the k=4 samples of each batch (greedy ones are 2)
    success = [s for r in sampled for s in r.success]
    reward = [x for r in sampled for x in r.reward]
    assert 0.25 in reward, "the test needs a partial reward"
    assert metrics["val/mean@4"] == pytest.approx(sum(success) / len(success))
    assert metrics["val/reward@4"] == pytest.approx(sum(reward) / len(reward))
    assert 0 <= metrics["val/mean@4"] <= metrics["val/pass@4"] <= 1
    assert metrics["val/greedy_acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_sampling_records_the_student_entropy_of_each_rollout(tiny_model):
    module = make(tiny_model)
    module.setup("fit")
    module.configure_model()
    rollouts = module.sample(examples(2), "train", 4, 0.7)  # the entropy is the model's, whatever the temperature
    for r in (0, 5):
        ids = torch.tensor([rollouts.prompt_ids[r] + rollouts.response_ids[r]])
        n = len(rollouts.response_ids[r])
        with torch.no_grad():
            log_p = module.student(input_ids=ids).logits[0, -n - 1:-1].double().log_softmax(-1)
        expected = -(log_p.exp() * log_p).sum()
        assert rollouts.entropy[r] == pytest.approx(float(expected), rel=1e-3)
    assert module.sample(examples(1), "val", 1, 0.0).entropy == []  # greedy decoding records nothing


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_passes_equal_padded_ones_in_float64(tiny_model, attn):
    """Packed passes (one forward per row, or one sequence with per-row positions as flash-attention runs it)
    give the padded rows' hidden states (float64, both attention implementations), computing no padded token."""
    from unittest.mock import patch

    from transformers import AutoModelForCausalLM

    from mopd_lightning.scoring import padded_fraction, plan_micro_batches, response_hidden_states

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64, attn_implementation=attn).eval()
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 17, 2, 9)]
    responses = [3, 8, 1, 8]  # each after at least one prompt token
    with torch.no_grad():
        padded = response_hidden_states(model, sequences, responses, pad_id=0)
        per_row = response_hidden_states(model, sequences, responses, pad_id=0, packed=True)
        with patch("mopd_lightning.scoring.varlen_attention", return_value=True):  # one packed sequence, as with
            one_sequence = response_hidden_states(model, sequences, responses, pad_id=0, packed=True)  # flash-attn
    tolerance = 1e-10 if attn == "sdpa" else 1e-6  # eager attention takes its softmax in float32
    torch.testing.assert_close(per_row, padded, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(one_sequence, padded, rtol=tolerance, atol=tolerance)
    lengths = [len(s) for s in sequences]
    assert padded_fraction([lengths], 10_000, packed=True) == 0.0 < padded_fraction([lengths], 10_000, packed=False)
    plan = plan_micro_batches(lengths, 20, packed=True)
    assert sorted(i for rows in plan for i in rows) == [0, 1, 2, 3]
    assert all(sum(lengths[i] for i in rows) <= 20 or len(rows) == 1 for rows in plan)


def test_a_packed_step_trains_like_a_padded_one_and_logs_no_padding(tiny_model):
    grads, logged = [], []
    for packed in (False, True):
        module = make(tiny_model, optim=OptimConfig(lr=1e-2, max_tokens_per_micro_batch=100, packed=packed))
        recorder = GradientRecorder()
        trainer = run(module, callbacks=[recorder])
        grads.append(recorder.grads)
        logged.append(float(trainer.logged_metrics["train/padded_fraction"]))
    assert logged[1] == 0.0 <= logged[0]  # (equal-length toy prompts may leave no padding to remove)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("model_type,setting", [("granite", {"logits_scaling": 4.0}),
                                                ("cohere", {"logit_scale": 0.25})])
def test_scaled_logits_are_the_models_own(tmp_path, model_type, setting):
    """Granite divides its logits by a constant, Cohere multiplies them: the log-probabilities every objective and
    the teacher read are the model's own."""
    from tiny import build_tiny_model

    from mopd_lightning.loss import token_logprobs
    from mopd_lightning.models import load_causal_lm
    from mopd_lightning.scoring import response_hidden_states

    model = load_causal_lm(str(build_tiny_model(tmp_path, model_type=model_type, **setting)))
    ids = [5, 17, 33, 8, 91, 40, 2]
    with torch.no_grad():
        own = model(input_ids=torch.tensor([ids])).logits[0, 2:-1].log_softmax(-1)
        hidden = response_hidden_states(model, [ids], [4], 0)
        ours = token_logprobs(hidden, output_weight(model), torch.tensor(ids[3:]))
    torch.testing.assert_close(ours, own.gather(-1, torch.tensor(ids[3:])[:, None])[:, 0], rtol=1e-5, atol=1e-6)


def test_a_model_that_soft_caps_its_logits_is_refused_at_load(tmp_path):
    from tiny import build_tiny_model

    from mopd_lightning.models import load_causal_lm

    path = build_tiny_model(tmp_path, model_type="gemma2", final_logit_softcapping=30.0)
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        load_causal_lm(str(path), attn_implementation="eager")


def test_a_logit_transform_the_library_does_not_know_is_refused_at_load(tmp_path, monkeypatch):
    from tiny import build_tiny_model

    import mopd_lightning.scoring as scoring
    from mopd_lightning.models import load_causal_lm

    path = build_tiny_model(tmp_path, model_type="granite", logits_scaling=4.0)
    monkeypatch.setattr(scoring, "logit_scale", lambda config: 1.0)  # as if Granite's scaling were unknown
    with pytest.raises(ValueError, match="granite.*differ from its scaled last hidden states"):
        load_causal_lm(str(path))


def test_the_student_is_exported_before_teardown_moves_it(tiny_model, tmp_path, monkeypatch):
    """On a GPU, Lightning's teardown moves the module to the CPU before ``on_fit_end`` (a sharded student's
    gather would then fail); forced here by a teardown that moves it off its device altogether."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from mopd_lightning.models import load_causal_lm

    teardown = SingleDeviceStrategy.teardown

    def leaving_the_device(strategy):
        teardown(strategy)
        strategy.lightning_module.to("meta")

    monkeypatch.setattr(SingleDeviceStrategy, "teardown", leaving_the_device)
    run(make(tiny_model, export_dir=str(tmp_path / "student")), steps=1)
    exported, initial = load_causal_lm(str(tmp_path / "student")), load_causal_lm(tiny_model)
    assert any(not torch.equal(a, b) for a, b in zip(exported.state_dict().values(), initial.state_dict().values()))
