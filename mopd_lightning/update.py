"""The update loop every method shares: ``optim.updates_per_batch`` optimizer steps on one batch of rollouts.

Each objective's loss is a token mean over the whole step, across micro-batches and ranks: every micro-batch adds
its token sum divided by that objective's global token count, so micro-batch size and device count do not change
the update. Around that: micro-batches planned by tokens, the log-probabilities before the first update (GRPO's
ratio, the importance weights of reused rollouts: exactly 1 on the first update, for every method and blend,
whatever sampled the rollouts), the skip on a non-finite loss or gradient, and the EMA step.
What to minimise comes from the objectives (``objectives.py``); the LightningModule lends the models, the
optimizer, the backward pass and its ranks.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import torch

from .loss import entropy_and_logprobs
from .objectives import MicroBatch, TrainingSignal, engine_importance_weights
from .rollouts import Rollouts
from .scoring import (final_hidden_states, mean_logp_and_entropy, output_weight, padded_fraction, plan_forwards,
                      response_hidden_states)
from .sharding import is_sharded

log = logging.getLogger(__name__)


class StudentUpdate:
    """The updates of one batch of rollouts (``module``: the MOPDModule); :meth:`run` returns the step's stats."""

    def __init__(self, module, rollouts: Rollouts, signal: TrainingSignal):
        self.module, self.rollouts, self.signal = module, rollouts, signal
        self.objectives = module.method.objectives
        plans = [objective.rows(rollouts, signal) for _, objective in self.objectives]
        self.plans = [(set(rows), counted) for rows, counted in plans]
        self.forward = sorted(set().union(*(rows for rows, _ in self.plans)))
        self.normalisers = [module.all_reduce(float(objective.tokens(rollouts, signal, counted)))
                            for (_, objective), (_, counted) in zip(self.objectives, self.plans)]
        self.correction = module.vllm_config.importance_sampling if rollouts.sample_logp else "none"
        self.engine_weights: Dict[int, torch.Tensor] = {}  # per rollout, set on the first update
        # per rollout with a teacher: the student's and the teacher's mean log-prob and entropy on its tokens, from
        # the first update's forward pass (before any change), for the step's teacher-signal metrics
        # (and the teacher's under swapped labels, for label_contrast)
        self.probes: Dict[str, Dict[int, Dict[str, Any]]] = {"student": {}, "teacher": {}, "contrast": {}}
        self.first_update = True

    def run(self) -> Dict[str, Any]:
        module, rollouts = self.module, self.rollouts
        # logp_old is the student's own at the first update, whatever sampled the rollouts: the sampler's log-probs
        # (vLLM's) measure the off-policy gap, they do not weight the loss.
        keep_old = module.method.needs_old_logp or module.optim.updates_per_batch > 1
        old_logp: Optional[Dict[int, torch.Tensor]] = {} if keep_old else None
        gauge = {"gap": 0.0, "entropy": 0.0, "weight": 0.0, "over": 0.0} if rollouts.sample_logp else None
        updates = [self._optimizer_step(update, old_logp, gauge if update == 0 else None)
                   for update in range(module.optim.updates_per_batch)]
        # Every update's loss and gradient norm (None: skipped), the first, on-policy one first.
        stats: Dict[str, Any] = {"loss_sums": [u["loss_sums"] for u in updates],
                                 "grad_norms": [u.get("grad_norm") for u in updates]}
        if gauge is not None:
            tokens = max(rollouts.tokens(self.forward), 1)
            stats.update(engine_logp_gap=gauge["gap"] / tokens, entropy=gauge["entropy"] / tokens)
            if self.correction != "none":
                stats.update(engine_is_weight=gauge["weight"] / tokens, engine_is_clipped=gauge["over"] / tokens)
        stats.update(forward_rows=len(self.forward), normalisers=self.normalisers,
                     padded_fraction=self._padded_fraction(), teacher_probes=self.probes)
        return stats

    def _optimizer_step(self, update: int, old_logp: Optional[Dict[int, torch.Tensor]],
                        gauge: Optional[Dict[str, float]]) -> Dict[str, Any]:
        """One optimizer update, in the order Lightning gives its own: the micro-batches' backward passes (the
        closure), the gradients unscaled (16-mixed), the callbacks' ``on_before_optimizer_step`` (they see every
        update's gradients, before clipping), then the clipping and the skip decision (:meth:`clip_or_skip`,
        called from the module's own hook), then the step. A training step is a batch of rollouts
        (``trainer.max_steps``, checkpoints every n steps, the step of logged metrics): the first update goes
        through Lightning, which counts it; the others through the strategy's optimizer step, uncounted."""
        module = self.module
        optimizer, schedule = module.optimizers(), module.lr_schedulers()
        self.stats: Dict[str, Any] = {"loss_sums": [0.0] * len(self.objectives)}
        self.first_update = update == 0
        self.finite, self.skipped = True, False

        def closure() -> None:
            self._backward(optimizer, old_logp, gauge)

        module.update_in_progress = self
        try:
            if update == 0:
                optimizer.step(closure=closure)
            else:
                module.trainer.strategy.optimizer_step(optimizer.optimizer, closure, module)
        finally:
            module.update_in_progress = None
        if self.skipped:
            module.skipped_steps += 1
            log.warning("non-finite loss or gradient: step skipped (%d so far)", module.skipped_steps)
            return self.stats
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        module.update_teacher()
        self.stats["grad_norm"] = self.grad_norm
        return self.stats

    def _backward(self, optimizer, old_logp: Optional[Dict[int, torch.Tensor]],
                  gauge: Optional[Dict[str, float]]) -> None:
        """Every micro-batch's forward and backward pass; the gradients are all-reduced with the last one."""
        module, rollouts, optim = self.module, self.rollouts, self.module.optim
        lengths = [len(rollouts.prompt_ids[r]) + len(rollouts.response_ids[r]) for r in self.forward]
        plan = plan_forwards(module.student, lengths, optim.max_tokens_per_micro_batch, optim.packed) or [[]]
        plan += [[]] * (module.forwards(len(plan)) - len(plan))
        anyone = module.all_reduce(float(len(self.forward))) > 0  # no signal anywhere: a step that changes nothing
        for m, rows in enumerate(plan if anyone else []):
            chosen = [self.forward[i] for i in rows]
            with optimizer.toggle_model(sync_grad=m == len(plan) - 1):
                if not chosen:  # this rank has no signal but must join the gradient all-reduce
                    module.manual_backward(self._zero_loss())
                    continue
                batch = self._micro_batch(chosen, old_logp, gauge)
                loss = batch.hidden.new_zeros(())
                for i, ((weight, objective), (rows_of, _)) in enumerate(zip(self.objectives, self.plans)):
                    members = [r for r in chosen if r in rows_of]
                    if not members:
                        continue
                    part = objective.loss_sum(batch.select(members), self.signal)
                    self.stats["loss_sums"][i] += float(part.detach())
                    loss = loss + weight * part * (module.trainer.world_size / self.normalisers[i])  # DDP averages
                self.finite &= bool(torch.isfinite(loss))
                module.manual_backward(loss)

    def clip_or_skip(self, optimizer) -> None:
        """After the callbacks saw the gradients: clip them (``optim.grad_clip``), and skip the step on every rank
        if any rank's loss or gradient is not finite. A skipped step has no gradients, so the optimizer leaves
        every weight and its state alone (and 16-mixed's scaler, which saw the overflow, still lowers its scale),
        yet Lightning counts it, so max_steps still bounds a run whose losses keep coming out non-finite."""
        module = self.module
        grad_norm = torch.nn.utils.clip_grad_norm_(module.student.parameters(), module.optim.grad_clip or float("inf"))
        finite = self.finite and bool(torch.isfinite(grad_norm))
        self.skipped = module.all_reduce(0.0 if finite else 1.0) > 0  # every rank skips together
        if self.skipped:
            optimizer.zero_grad(set_to_none=True)
        self.grad_norm = float(grad_norm)

    def _micro_batch(self, rows: List[int], old_logp: Optional[Dict[int, torch.Tensor]],
                     gauge: Optional[Dict[str, float]] = None) -> MicroBatch:
        """The student's forward pass on ``rows``; records their log-probabilities on the first update.

        With a separate sampling engine, ``gauge`` sums the student's entropy and its log-prob gap to the engine on
        these tokens (what the ``hf`` sampler's entropy is; the gap is the off-policy error of the rollouts) and,
        with ``model.vllm.importance_sampling``, the weights correcting that error: taken here, before the first
        update, and kept for the batch's later updates.
        """
        module, rollouts = self.module, self.rollouts
        lengths = [len(rollouts.response_ids[r]) for r in rows]
        hidden = response_hidden_states(module.student, [rollouts.prompt_ids[r] + rollouts.response_ids[r]
                                                         for r in rows],
                                        lengths, module.tokenizer.pad_token_id, module.optim.packed)
        tokens = torch.tensor([t for r in rows for t in rollouts.response_ids[r]], device=hidden.device)
        batch = MicroBatch(rows, hidden, output_weight(module.student), tokens, lengths,
                           temperature=module.sampling.temperature)
        if self.first_update:  # before the weights move
            self._probe(rows, hidden, batch.weight, lengths)
        if gauge is not None:
            with torch.no_grad():
                entropy, logp = entropy_and_logprobs(hidden.detach(), batch.weight.detach(), tokens)
            engine = torch.tensor([x for r in rows for x in rollouts.sample_logp[r]], device=logp.device)
            gauge["gap"] += float((engine - logp).abs().sum())
            gauge["entropy"] += float(entropy.sum())
            if self.correction != "none":
                config = module.vllm_config
                weights, over = engine_importance_weights(logp.float() - engine, lengths, self.correction,
                                                          config.importance_sampling_cap)
                self.engine_weights.update(zip(rows, weights.split(lengths)))
                gauge["weight"] += float(weights.sum())
                gauge["over"] += float(over.sum())
        if self.engine_weights:
            batch.engine_weight = torch.cat([self.engine_weights[r] for r in rows])
        if old_logp is not None:
            if any(r not in old_logp for r in rows):
                old_logp.update(zip(rows, batch.current_logp().split(lengths)))
            batch.old_logp = torch.cat([old_logp[r] for r in rows])
        return batch

    @torch.no_grad()
    def _probe(self, rows: List[int], hidden: torch.Tensor, weight: torch.Tensor, lengths: List[int]) -> None:
        """Score the rows that have a teacher as the analysis scores them (``mean_logp_and_entropy``): the student
        on the hidden states this pass computed anyway, the teacher on those the teacher phase kept."""
        signal, response_ids = self.signal, self.rollouts.response_ids
        taught = [r for r in rows if r in signal.teacher_hidden]
        if not taught:
            return
        mine = dict(zip(rows, hidden.detach().split(lengths)))
        parts = {r: {"answer": signal.answer_positions.get(r, [])} for r in taught}
        self.probes["student"].update(mean_logp_and_entropy({r: mine[r] for r in taught}, weight.detach(),
                                                            response_ids, parts))
        self.probes["teacher"].update(mean_logp_and_entropy({r: signal.teacher_hidden[r] for r in taught},
                                                            signal.teacher_weight, response_ids, parts))
        if signal.contrast_hidden:
            self.probes["contrast"].update(mean_logp_and_entropy({r: signal.contrast_hidden[r] for r in taught},
                                                                 signal.teacher_weight, response_ids, parts))

    def _padded_fraction(self) -> float:
        """Padding's share of the tokens this step's teacher, reference and student passes computed."""
        rollouts, signal, optim = self.rollouts, self.signal, self.module.optim
        full = {r: len(rollouts.prompt_ids[r]) + len(ids) for r, ids in enumerate(rollouts.response_ids)}
        passes = [[full[r] for r in self.forward], [full[r] for r in signal.reference_logp]]
        for contexts in (signal.contexts, signal.contrast_contexts):
            if contexts is not None:
                passes.append([len(contexts[r].prompt_ids) + len(rollouts.response_ids[r])
                               for r, c in enumerate(signal.contexts) if c.active])
        return padded_fraction(passes, optim.max_tokens_per_micro_batch, optim.packed)

    def _zero_loss(self) -> torch.Tensor:
        """A loss of 0 that gives every parameter a (zero) gradient; sharded, through a real forward pass, since
        the other ranks' forward passes gather weights from this one."""
        student = self.module.student
        if not is_sharded(student):
            return sum(p.sum() for p in student.parameters()) * 0.0
        pad = torch.tensor([[self.module.tokenizer.pad_token_id]], device=self.module.device)
        return (final_hidden_states(student, input_ids=pad).sum() + output_weight(student).sum()) * 0.0
