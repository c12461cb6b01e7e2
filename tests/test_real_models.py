"""The real path: the embedded students (SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B-Instruct) from their wheels, for
one MOPD step each, and what only the Qwen model has (a default system turn, a 151,936-row untied head). Slow; CI
runs them."""

import pytest
import torch

from mopd_lightning import MOPDModule, PromptDataModule
from mopd_lightning.config import OptimConfig, SamplingConfig
from mopd_lightning.models import load_causal_lm, load_tokenizer
from mopd_lightning.peers import teacher_messages
from mopd_lightning.scoring import output_weight

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("student, domain", [("demo", "sci"), ("qwen-coder-0.5b", "code")])
def test_one_step_on_an_embedded_model(student, domain):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from mopd_lightning.data.datamodule import PromptStream

    data = PromptDataModule(domain=domain, batch_size=1 if domain == "code" else 2)
    data.setup("fit")
    module = MOPDModule(student=student, sampling=SamplingConfig(group_size=2, max_new_tokens=24),
                        optim=OptimConfig(lr=1e-5))
    module.setup("fit")
    module.configure_model()
    head = output_weight(module.student)
    before = module.student.model.layers[0].mlp.up_proj.weight.detach().clone(), head.detach().clone()
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    stream = PromptStream(data.datasets["train"], data.batch_size, 0, True)
    trainer.fit(module, train_dataloaders=DataLoader(stream, batch_size=None))
    metrics = trainer.logged_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert not torch.equal(before[0], module.student.model.layers[0].mlp.up_proj.weight)
    if metrics["train/active_fraction"] > 0:  # a distillation signal reached the output head
        assert not torch.equal(before[1], output_weight(module.student))
    text = module.tokenizer.decode(module.render([{"role": "user", "content": "Hi"}]))
    assert text.endswith("<|im_start|>assistant\n")


def test_qwen_coder_has_its_own_untied_head_over_the_qwen_vocabulary():
    model = load_causal_lm("qwen-coder-0.5b")
    head, embedding = output_weight(model), model.get_input_embeddings().weight
    assert head.shape == embedding.shape == (151936, 896)
    assert head.data_ptr() != embedding.data_ptr() and not torch.equal(head, embedding)
    assert len(load_tokenizer("qwen-coder-0.5b")) <= head.shape[0]


def test_qwen_coder_system_turn_is_the_same_for_student_and_teacher():
    """Qwen's template adds its default system turn when a prompt has none: the teacher context must get the same
    one; a system prompt of the data's replaces it in both, once."""
    tokenizer = load_tokenizer("qwen-coder-0.5b")
    render = lambda messages: tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    from mopd_lightning.config import PeerConfig

    for system_prompt in (None, "Answer with code only."):
        data = PromptDataModule(domain="code", system_prompt=system_prompt)
        data.setup("validate")
        example = data.datasets["validation"][0]
        student = render(example.messages)
        teacher = render(teacher_messages(example, ["def f(): pass"], [True], [None], PeerConfig()))
        system = student[: student.index("<|im_start|>user")]
        assert teacher.startswith(system) and teacher.count("<|im_start|>system") == 1
        if system_prompt is None:
            assert "You are Qwen, created by Alibaba Cloud" in system
        else:
            assert system == f"<|im_start|>system\n{system_prompt}<|im_end|>\n"


def test_the_analysis_says_yes_on_the_positive_control():
    """On questions whose answer only the group's successes know (configs/peer_control.yaml), the demo model's teacher
    shown a success moves toward its answer, on the answer span. The full run (48 prompts x 8,
    benchmarks/results/analysis_peer_control_demo.md, rerun on 2026-12-07) gives 1S 0.96 [0.92, 1.00] and 2S1F 0.68
    [0.57, 0.79] on the answer span, 2S1F +0.14 [+0.06, +0.22] over the block-mode random_peer, while the whole
    response says 0.50. These are its first 16 prompts in the same batches of 8, so the same rollouts (each a function
    of the seed and the prompt): there 1S reaches 0.97 on 8 prompts, 2S1F 0.81 on the answer span against 0.49 on the
    whole response, +0.09 over random_peer; the bounds leave room for float noise, not for a lost signal."""
    from mopd_lightning.analysis import summarize, teacher_signal_records
    from mopd_lightning.config import VerifierConfig

    data = PromptDataModule(domain="facts", num_val=16, val_batch_size=8)
    data.setup("validate")
    module = MOPDModule(student="demo", sampling=SamplingConfig(group_size=8, max_new_tokens=64),
                        verifier=VerifierConfig(strict=False))
    module.setup("validate")
    module.configure_model()
    module.eval()
    variants = ["1S", "2S1F", "random_peer"]
    prompts = data.datasets["validation"]
    with torch.no_grad():
        records = [r for start in (0, 8) for r in teacher_signal_records(module, prompts[start:start + 8], variants)]
    summary = summarize(records, variants, samples=200)
    one, mixed = summary["variants"]["1S"], summary["variants"]["2S1F"]
    assert one["auc_answer"]["n"] >= 4 and one["auc_answer"]["mean"] > 0.85
    assert mixed["auc_answer"]["mean"] > max(0.6, mixed["auc"]["mean"])  # the answer span, not the whole response
    assert mixed["auc_answer_minus_random_peer"]["mean"] > 0


STEPS, GAP = 30, 0.12  # the full run's step-30 gap was +0.28; the base model's is -0.01


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_grpo_learns_the_facts_of_the_training_control(tmp_path):
    """The training control (configs/facts_learnable.yaml: 8 invented facts answered by name) can be learned: a short
    GRPO run at its settings puts the trained questions, their options shuffled again, above unseen questions (whose
    accuracy only the answer format can raise). The full run (benchmarks/results/compare_facts_named_120.md, seed 0)
    had shuffled-trained 0.453 against unseen 0.172 at step 30, from 0.070 / 0.078 at step 0."""
    from pathlib import Path

    from mopd_lightning.cli import MOPDCLI, MOPDTrainer
    from mopd_lightning.rewards import get_verifier, verify_batch

    config = Path(__file__).resolve().parents[1] / "configs" / "facts_learnable.yaml"
    cli = MOPDCLI(MOPDModule, PromptDataModule, trainer_class=MOPDTrainer, run=False, save_config_callback=None,
                  args=["--config", str(config), "--model.method", "grpo", "--trainer.max_steps", str(STEPS),
                        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
                        "--trainer.callbacks", "[]", "--trainer.limit_val_batches", "0",
                        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])
    module, data = cli.model, cli.datamodule
    cli.trainer.fit(module, datamodule=data)
    data.setup("test")
    module.eval()

    def accuracy(examples, k=4):
        with torch.no_grad():
            rollouts = module.sample(examples, "test", k, module.sampling.val_temperature)
        scores = verify_batch(get_verifier("named", strict=False), rollouts.response_text,
                              [examples[g].ground_truth for g in rollouts.group])
        return sum(score.reward for score in scores) / len(scores)

    shuffled, unseen = accuracy(data.datasets["test"][:16]), accuracy(data.datasets["validation"][:16])
    assert shuffled - unseen > GAP, (shuffled, unseen)
