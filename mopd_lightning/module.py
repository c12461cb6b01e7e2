"""``MOPDModule``: one MOPD step per batch of prompts (sample, verify, peer contexts, teacher, distil, update).

``training_step`` reads as the algorithm; each phase lives in its own module:
sampling (``sampling.py``), verification (``rewards/``), peer contexts (``peers.py``), teacher
(``teacher.py``), forward passes (``scoring.py``) and the loss (``loss.py``).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import lightning.pytorch as pl
import torch
from torchmetrics import MeanMetric

from .config import LossConfig, OptimConfig, PeerConfig, SamplingConfig, TeacherConfig
from .data.example import Example
from .loss import distillation_loss, sampled_token_logprobs
from .metrics import PassAtK
from .models import check_same_vocabulary, load_causal_lm, load_tokenizer
from .peers import TeacherContext, build_teacher_contexts
from .rewards import Score, verify_batch
from .sampling import Rollouts, sample_groups, stable_seed
from .scoring import output_weight, plan_micro_batches, response_hidden_states
from .teacher import ema_update, make_teacher
from .timing import PhaseTimer

log = logging.getLogger(__name__)


@dataclass
class Distillation:
    """What the student update needs: per-rollout teacher prompts and the teacher's hidden states."""

    contexts: List[TeacherContext]
    teacher_hidden: Dict[int, torch.Tensor]  # rollout index -> (response tokens, H)

    @property
    def active(self) -> List[int]:
        return [r for r, c in enumerate(self.contexts) if c.active]


class MOPDModule(pl.LightningModule):
    def __init__(
        self,
        model: str = "demo",
        dtype: str = "float32",
        attn_implementation: str = "auto",
        gradient_checkpointing: bool = False,
        sampling: SamplingConfig = SamplingConfig(),
        peers: PeerConfig = PeerConfig(),
        teacher: TeacherConfig = TeacherConfig(),
        loss: LossConfig = LossConfig(),
        optim: OptimConfig = OptimConfig(),
        seed: int = 0,
        export_dir: Optional[str] = None,
    ):
        """
        Args:
            model: the student: ``demo`` (embedded SmolLM2-135M-Instruct), a hub id or a local checkpoint.
            dtype: weight dtype (float32, bfloat16, float16); on a GPU prefer float32 weights with
                ``trainer.precision: bf16-mixed``.
            attn_implementation: ``auto`` = flash-attention 2 on CUDA when installed, else SDPA.
            gradient_checkpointing: recompute activations in the backward pass to save memory.
            sampling: how rollouts are drawn.
            peers: which peers each teacher context holds, and its wording.
            teacher: which model scores the rollouts under the peer context.
            loss: the distillation divergence.
            optim: optimizer and micro-batching.
            seed: seeds sampling and peer choice; the same seed gives the same run.
            export_dir: when set, the final student and its tokenizer are saved here (transformers format).
        """
        super().__init__()
        # export_dir stays out of the checkpoint: LightningCLI re-applies checkpoint hparams on --ckpt_path.
        self.save_hyperparameters(ignore=["export_dir"])
        self.automatic_optimization = False
        self.model_name, self.dtype_name, self.attn = model, dtype, attn_implementation
        self.gradient_checkpointing = gradient_checkpointing
        self.sampling, self.peers, self.teacher_config = sampling, peers, teacher
        self.loss_config, self.optim, self.seed, self.export_dir = loss, optim, seed, export_dir
        self.student: Optional[torch.nn.Module] = None
        self.teacher: Optional[torch.nn.Module] = None
        self.tokenizer = None
        self.rollout_batches = 0  # batches of rollouts trained on; keys the sampling seeds
        self.skipped_steps = 0  # steps dropped for a non-finite loss or gradient
        k = sampling.val_samples
        self.eval_metrics = torch.nn.ModuleDict({
            stage: torch.nn.ModuleDict({"mean": MeanMetric(), "pass": PassAtK(k)}) for stage in ("val", "test")
        })

    # -- models ---------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Tokenizers first: an external teacher with another vocabulary fails before any weights load."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.model_name)
        if self.teacher_config.kind == "external":
            check_same_vocabulary(self.tokenizer, load_tokenizer(self.teacher_config.path), self.teacher_config.path)

    def configure_model(self) -> None:
        if self.student is not None:
            return
        self.student = load_causal_lm(self.model_name, self.dtype_name, self.attn).train()
        if self.gradient_checkpointing:
            self.student.gradient_checkpointing_enable()
        self.teacher = make_teacher(self.student, self.teacher_config,
                                    lambda path: load_causal_lm(path, self.dtype_name, self.attn))
        if self.teacher is not None and self.teacher_config.kind == "external":
            rows = output_weight(self.student).shape[0], output_weight(self.teacher).shape[0]
            if rows[0] != rows[1]:
                raise ValueError(f"model.teacher.path: {self.teacher_config.path!r} has an output vocabulary of "
                                 f"{rows[1]} rows, the student {rows[0]}")

    @property
    def scoring_teacher(self) -> torch.nn.Module:
        return self.student if self.teacher is None else self.teacher

    def configure_optimizers(self):
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.optim.lr, betas=tuple(self.optim.betas),
                                      weight_decay=self.optim.weight_decay)
        warmup = self.optim.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return [optimizer], [schedule]

    # -- one MOPD step --------------------------------------------------------------------------------------
    def training_step(self, batch: List[Example], batch_idx: int) -> None:
        timer = PhaseTimer()
        with timer.phase("sample"):
            rollouts = self.sample(batch, "train", self.sampling.group_size, self.sampling.temperature)
        with timer.phase("verify"):
            scores = self.verify(batch, rollouts)
        with timer.phase("teacher"):
            distillation = self.score_with_teacher(batch, rollouts, scores)
        with timer.phase("student"):
            stats = self.update_student(rollouts, distillation)
        self.rollout_batches += 1
        self.log_step(rollouts, scores, distillation, stats, timer)

    def sample(self, batch: List[Example], stage: str, group_size: int, temperature: float) -> Rollouts:
        """``group_size`` rollouts per prompt; training seeds change every step, evaluation seeds do not."""
        step = self.rollout_batches if stage == "train" else "eval"
        seeds = [[stable_seed(self.seed, stage, step, e.id, k) for k in range(group_size)] for e in batch]
        prompts = [self.render(e.messages) for e in batch]
        return sample_groups(self.student, self.tokenizer, prompts, group_size, seeds, self.sampling.max_new_tokens,
                             temperature, self.sampling.top_p, self.sampling.top_k)

    def render(self, messages: List[Dict[str, str]]) -> List[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))

    def verify(self, batch: List[Example], rollouts: Rollouts) -> List[Score]:
        """Scores in rollout order; each domain's rollouts are verified together, in parallel."""
        names = [batch[g].verifier for g in rollouts.group]
        scores: List[Optional[Score]] = [None] * len(rollouts)
        for name in sorted(set(names)):
            chosen = [r for r, n in enumerate(names) if n == name]
            results = verify_batch(name, [rollouts.response_text[r] for r in chosen],
                                   [batch[rollouts.group[r]].ground_truth for r in chosen])
            for r, score in zip(chosen, results):
                scores[r] = score
        return scores

    @torch.no_grad()
    def score_with_teacher(self, batch: List[Example], rollouts: Rollouts, scores: List[Score]) -> Distillation:
        """Build each rollout's peer context and run the teacher over ``[teacher prompt ; response]``."""
        contexts: List[TeacherContext] = []
        for g, example in enumerate(batch):
            members = [r for r in range(len(rollouts)) if rollouts.group[r] == g]
            contexts += build_teacher_contexts(
                example, [rollouts.response_ids[r] for r in members],
                [scores[r].reward >= self.peers.success_threshold for r in members],
                [scores[r].feedback for r in members], self.tokenizer, self.peers,
                seed_key=f"{self.seed}:{self.rollout_batches}:{example.id}")
        active = [r for r, c in enumerate(contexts) if c.active]
        sequences = {r: contexts[r].prompt_ids + rollouts.response_ids[r] for r in active}
        teacher, hidden = self.scoring_teacher, {}
        for rows in plan_micro_batches([len(sequences[r]) for r in active], self.optim.max_tokens_per_micro_batch):
            chosen = [active[i] for i in rows]
            lengths = [len(rollouts.response_ids[r]) for r in chosen]
            states = response_hidden_states(teacher, [sequences[r] for r in chosen], lengths,
                                            self.tokenizer.pad_token_id)
            hidden.update(zip(chosen, states.split(lengths)))
        return Distillation(contexts, hidden)

    def update_student(self, rollouts: Rollouts, distillation: Distillation) -> Dict[str, float]:
        """``optim.updates_per_batch`` optimizer steps on this batch of rollouts, each followed by the EMA update.

        The first step is exactly on-policy (importance weight 1); later ones reuse the rollouts with the
        detached, clipped weight ``min(exp(logp - logp_old), loss.is_clip)`` per token.
        """
        reuse = self.optim.updates_per_batch > 1
        old_logp: Optional[Dict[int, torch.Tensor]] = {} if reuse else None
        for update in range(self.optim.updates_per_batch):
            stats = self._optimizer_step(rollouts, distillation, old_logp, record_logp=reuse and update == 0)
        return stats

    def _optimizer_step(self, rollouts: Rollouts, distillation: Distillation,
                        old_logp: Optional[Dict[int, torch.Tensor]], record_logp: bool) -> Dict[str, float]:
        """Distil on every active response token, then one optimizer step.

        The loss is a token mean over the whole step, across micro-batches and ranks: each micro-batch adds
        its token sum divided by the global token count, so micro-batch size and device count do not matter.
        """
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        active = distillation.active
        local_tokens = sum(len(rollouts.response_ids[r]) for r in active)
        global_tokens = int(self._all_reduce(float(local_tokens)))
        stats = {"loss_sum": 0.0, "entropy_sum": 0.0, "tokens": local_tokens, "global_tokens": global_tokens}
        if global_tokens == 0:  # no rollout anywhere has a peer: nothing to learn from this batch
            return stats
        scale = self.trainer.world_size / global_tokens  # DDP averages gradients over ranks
        lengths = [len(rollouts.prompt_ids[r]) + len(rollouts.response_ids[r]) for r in active]
        plan = plan_micro_batches(lengths, self.optim.max_tokens_per_micro_batch) or [[]]
        teacher_weight = output_weight(self.scoring_teacher).detach()
        finite = True
        for m, rows in enumerate(plan):
            chosen = [active[i] for i in rows]
            with optimizer.toggle_model(sync_grad=m == len(plan) - 1):
                if not chosen:  # this rank has no signal but must join the gradient all-reduce
                    self.manual_backward(sum(p.sum() for p in self.student.parameters()) * 0.0)
                    continue
                lengths = [len(rollouts.response_ids[r]) for r in chosen]
                student_hidden = response_hidden_states(
                    self.student, [rollouts.prompt_ids[r] + rollouts.response_ids[r] for r in chosen], lengths,
                    self.tokenizer.pad_token_id)
                teacher_hidden = torch.cat([distillation.teacher_hidden[r] for r in chosen])
                weights = self._importance_weights(student_hidden, rollouts, chosen, old_logp, record_logp)
                loss_sum, entropy_sum = distillation_loss(student_hidden, output_weight(self.student), teacher_hidden,
                                                          teacher_weight, weights, self.loss_config)
                finite &= bool(torch.isfinite(loss_sum))
                self.manual_backward(loss_sum * scale)
                stats["loss_sum"] += float(loss_sum.detach())
                stats["entropy_sum"] += float(entropy_sum)
        max_norm = self.optim.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), max_norm)
        finite = finite and bool(torch.isfinite(grad_norm))
        if self._all_reduce(0.0 if finite else 1.0) > 0:  # every rank skips together
            self.skipped_steps += 1
            # With no gradients the optimizer leaves every weight and its state alone, yet Lightning counts
            # the step, so max_steps still bounds a run whose losses keep coming out non-finite.
            optimizer.zero_grad(set_to_none=True)
            optimizer.step()
            log.warning("non-finite loss or gradient: step skipped (%d so far)", self.skipped_steps)
            return stats
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if self.teacher_config.kind == "ema":
            ema_update(self.teacher, self.student, self.teacher_config.ema_rate)
        stats["grad_norm"] = float(grad_norm)
        return stats

    def _importance_weights(self, student_hidden: torch.Tensor, rollouts: Rollouts, chosen: List[int],
                            old_logp: Optional[Dict[int, torch.Tensor]], record_logp: bool) -> torch.Tensor:
        """Per-token weights: exactly 1 on-policy; ``min(exp(logp - logp_old), is_clip)`` on reused rollouts."""
        ones = torch.ones(student_hidden.shape[0], device=student_hidden.device)
        if old_logp is None:
            return ones
        tokens = torch.cat([torch.tensor(rollouts.response_ids[r]) for r in chosen]).to(student_hidden.device)
        logp = sampled_token_logprobs(student_hidden, output_weight(self.student), tokens)
        lengths = [len(rollouts.response_ids[r]) for r in chosen]
        if record_logp:
            old_logp.update(zip(chosen, logp.split(lengths)))
            return ones
        reference = torch.cat([old_logp[r] for r in chosen])
        return (logp - reference).exp().clamp(max=self.loss_config.is_clip)

    def _all_reduce(self, value: float) -> float:
        if self.trainer.world_size == 1:
            return value
        tensor = torch.tensor(value, dtype=torch.float64, device=self.device)
        return float(self.trainer.strategy.reduce(tensor, reduce_op="sum"))

    # -- logging --------------------------------------------------------------------------------------------
    def log_step(self, rollouts: Rollouts, scores: List[Score], distillation: Distillation,
                 stats: Dict[str, float], timer: PhaseTimer) -> None:
        rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32)
        success = rewards >= self.peers.success_threshold
        groups = torch.tensor(rollouts.group)
        mixed = [bool(success[groups == g].any() and (~success[groups == g]).any()) for g in groups.unique()]
        contexts = distillation.contexts
        active = [c for c in contexts if c.active]
        prompt_lengths = [len(c.prompt_ids) for c in active] or [0]
        peers_total = sum(c.peers.count for c in contexts)
        response_tokens = sum(map(len, rollouts.response_ids))
        global_tokens = max(stats["global_tokens"], 1)
        metrics = {
            "train/reward": rewards.mean().item(),
            "train/success_rate": success.float().mean().item(),
            "train/mixed_group_fraction": sum(mixed) / len(mixed),
            "train/active_fraction": len(active) / len(contexts),
            "train/peers_per_context": peers_total / len(contexts),
            "train/teacher_prompt_len_mean": sum(prompt_lengths) / len(prompt_lengths),
            "train/teacher_prompt_len_max": float(max(prompt_lengths)),
            "train/peer_truncation_fraction": sum(c.truncated_peers for c in contexts) / max(peers_total, 1),
            "train/loss": self._all_reduce(stats["loss_sum"]) / global_tokens,
            "train/entropy": self._all_reduce(stats["entropy_sum"]) / global_tokens,
            "train/response_len": response_tokens / len(rollouts),
            "train/finished_fraction": sum(rollouts.finished) / len(rollouts),
            "train/skipped_steps": float(self.skipped_steps),
            "train/feedback_in_context": float(self.peers.include_feedback),
            "time/step_s": timer.total,
            "throughput/tokens_per_s": response_tokens / max(timer.total, 1e-9),
            **{f"time/{name}_s": seconds for name, seconds in timer.seconds.items()},
        }
        if "grad_norm" in stats:
            metrics["train/grad_norm"] = stats["grad_norm"]
        progress = {"train/reward", "train/loss"}
        batch_size = len(set(rollouts.group))
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name in progress, batch_size=batch_size,
                     sync_dist=name not in {"train/loss", "train/entropy"})

    # -- evaluation -----------------------------------------------------------------------------------------
    def validation_step(self, batch: List[Example], batch_idx: int) -> None:
        self.evaluate(batch, "val")

    def test_step(self, batch: List[Example], batch_idx: int) -> None:
        self.evaluate(batch, "test")

    @torch.no_grad()
    def evaluate(self, batch: List[Example], stage: str) -> None:
        """mean@k and pass@k with k = ``sampling.val_samples`` rollouts per prompt."""
        k = self.sampling.val_samples
        rollouts = self.sample(batch, stage, k, self.sampling.val_temperature)
        rewards = torch.tensor([s.reward for s in self.verify(batch, rollouts)]).view(len(batch), k)
        correct = (rewards >= self.peers.success_threshold).sum(-1)
        metrics = self.eval_metrics[stage]
        metrics["mean"].update(rewards.mean(-1))
        metrics["pass"].update(torch.full_like(correct, k), correct)
        self.log(f"{stage}/mean@{k}", metrics["mean"], prog_bar=True, batch_size=len(batch))
        self.log(f"{stage}/pass@{k}", metrics["pass"], prog_bar=True, batch_size=len(batch))

    # -- checkpoints and export -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["mopd"] = {
            "rollout_batches": self.rollout_batches,
            "skipped_steps": self.skipped_steps,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        state = checkpoint.get("mopd", {})
        self.rollout_batches = state.get("rollout_batches", 0)
        self.skipped_steps = state.get("skipped_steps", 0)
        if "rng" in state:
            torch.set_rng_state(state["rng"]["torch"])
            random.setstate(state["rng"]["python"])
            if state["rng"]["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def on_fit_end(self) -> None:
        if self.export_dir and self.trainer.is_global_zero:
            self.export(self.export_dir)

    def export(self, path: str) -> None:
        """Save the student and its tokenizer as a transformers checkpoint."""
        self.student.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        log.info("exported the student to %s", path)
