"""Per-token objectives: what a method minimises on a micro-batch of the student's own rollouts.

The update loop (``update.py``) is shared by every method: micro-batching, the global token
normaliser, the non-finite skip, importance weights and the EMA update live there. An objective only says

- ``rows``: which rollouts it reads (``forward``) and whose tokens its mean runs over (``counted``; a GRPO
  rollout with zero advantage counts without needing a forward pass), and
- ``loss_sum``: its summed token loss on one :class:`MicroBatch`;
- ``learns_from``: whether a group with these rewards can teach it anything (dynamic sampling keeps such groups).

The loop divides each objective's sum by its own global token count and weights the objectives, so a blend
``lambda * GRPO + (1 - lambda) * distillation`` is two token means, each exactly as in its pure method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .config import GRPOConfig, LossConfig, PreferenceConfig
from .loss import distillation_loss, token_logprobs
from .peers import TeacherContext
from .rollouts import Rollouts


@dataclass
class TrainingSignal:
    """What the teacher phase prepared for one batch; each objective reads its own part."""

    contexts: Optional[List[TeacherContext]] = None  # peer contexts (distillation)
    teacher_hidden: Dict[int, torch.Tensor] = field(default_factory=dict)  # rollout -> (response tokens, H)
    teacher_weight: Optional[torch.Tensor] = None  # the teacher's output projection (V, H)
    # label_contrast: the same contexts with the peers' labels swapped, and the teacher's hidden states there
    contrast_contexts: Optional[List[TeacherContext]] = None
    contrast_hidden: Dict[int, torch.Tensor] = field(default_factory=dict)
    advantages: Optional[List[float]] = None  # per rollout (GRPO)
    reference_logp: Dict[int, torch.Tensor] = field(default_factory=dict)  # rollout -> (response tokens,) (KL)
    answer_positions: Dict[int, List[int]] = field(default_factory=dict)  # rollout -> its answer's tokens
    # (distillation on the answer alone, model.loss.tokens: answer)
    pairs: Optional["PreferencePairs"] = None  # the step's preference pairs (dpo, simpo)


class Objective:
    """The token count an objective's mean divides by: every response token of its counted rollouts, unless the
    objective says otherwise; no reference model (the initial student's log-probabilities) unless it says so."""

    needs_reference = False

    def tokens(self, rollouts: Rollouts, signal: TrainingSignal, rows: Sequence[int]) -> int:
        return rollouts.tokens(rows)


class MicroBatch:
    """The student on some rollouts: final hidden states at the response positions (with gradient), the output
    projection, the response tokens, and the log-probabilities recorded before the first update (if any).

    Policy log-probabilities (GRPO's ratio and KL, importance weights, SFT's likelihood) are taken at the sampling
    ``temperature``, the distribution the rollouts were drawn from (before top-k / top-p), as verl and TRL do; the
    distillation divergence compares student and teacher at ``loss.temperature`` instead.
    """

    def __init__(self, rows: Sequence[int], hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                 lengths: Sequence[int], old_logp: Optional[torch.Tensor] = None, temperature: float = 1.0,
                 engine_weight: Optional[torch.Tensor] = None):
        self.rows, self.hidden, self.weight, self.tokens = list(rows), hidden, weight, tokens
        self.lengths, self.old_logp, self.temperature = list(lengths), old_logp, temperature
        self.engine_weight = engine_weight  # per token: the sampling engine's off-policy correction, when enabled

    def weighted(self, losses: torch.Tensor) -> torch.Tensor:
        """Per-token losses times the engine's importance weights (``model.vllm.importance_sampling``), if any."""
        return losses if self.engine_weight is None else losses * self.engine_weight

    @cached_property
    def logp(self) -> torch.Tensor:
        """log p(token) of each response token under the student at the sampling temperature, differentiable."""
        return token_logprobs(self.hidden, self.weight, self.tokens, temperature=self.temperature)

    def current_logp(self) -> torch.Tensor:
        """The same, detached (computed without a graph unless ``logp`` already exists)."""
        if "logp" in self.__dict__:
            return self.logp.detach()
        with torch.no_grad():
            return token_logprobs(self.hidden, self.weight, self.tokens, temperature=self.temperature)

    def at_positions(self, positions: Sequence[Sequence[int]]) -> torch.Tensor:
        """1 at the given token positions of each row (``positions[i]`` for row i), 0 elsewhere."""
        mask = torch.zeros(sum(self.lengths), device=self.hidden.device)
        starts = [sum(self.lengths[:i]) for i in range(len(self.lengths))]
        mask[[start + k for start, row in zip(starts, positions) for k in row]] = 1.0
        return mask

    def per_token(self, values: Sequence[float]) -> torch.Tensor:
        """One value per row, repeated over that row's tokens."""
        return torch.repeat_interleave(torch.tensor(values, dtype=torch.float32, device=self.hidden.device),
                                       torch.tensor(self.lengths, device=self.hidden.device))

    def select(self, rows: Sequence[int]) -> "MicroBatch":
        """The tokens of ``rows`` (a subset of this micro-batch's rows, in its order)."""
        if list(rows) == self.rows:
            return self
        keep = set(rows)
        mask = torch.cat([torch.full((n,), r in keep, dtype=torch.bool) for r, n in zip(self.rows, self.lengths)])
        mask = mask.to(self.hidden.device)
        part = MicroBatch([r for r in self.rows if r in keep], self.hidden[mask], self.weight, self.tokens[mask],
                          [n for r, n in zip(self.rows, self.lengths) if r in keep],
                          None if self.old_logp is None else self.old_logp[mask], self.temperature,
                          None if self.engine_weight is None else self.engine_weight[mask])
        if "logp" in self.__dict__:
            part.logp = self.logp[mask]
        return part


class Distillation(Objective):
    """Token-level divergence from the teacher under the peer context (MOPD, OPD, teacher-OPD), on every response
    token or on the answer's alone (``loss.tokens``).

    Reused rollouts (``optim.updates_per_batch > 1``) weight each token by ``min(exp(logp - logp_old), is_clip)``
    (detached); on the first, on-policy update that weight is exactly 1.
    """

    name = "distill"
    needs_teacher = True
    needs_old_logp = False

    def __init__(self, config: LossConfig):
        self.config = config

    def rows(self, rollouts: Rollouts, signal: TrainingSignal) -> Tuple[List[int], List[int]]:
        active = [r for r, context in enumerate(signal.contexts) if context.active]
        return active, active

    @staticmethod
    def learns_from(rewards: Sequence[float], success: Sequence[bool]) -> bool:
        """The contrast MOPD is built on: a success and a failure to show."""
        return len(set(success)) == 2

    def tokens(self, rollouts: Rollouts, signal: TrainingSignal, rows: Sequence[int]) -> int:
        if self.config.tokens == "answer":
            return sum(len(signal.answer_positions[r]) for r in rows)
        return rollouts.tokens(rows)

    def loss_sum(self, batch: MicroBatch, signal: TrainingSignal) -> torch.Tensor:
        teacher_hidden = torch.cat([signal.teacher_hidden[r] for r in batch.rows])
        if batch.old_logp is None:
            weights = torch.ones(batch.hidden.shape[0], device=batch.hidden.device)
        else:
            weights = (batch.current_logp() - batch.old_logp).exp().clamp(max=self.config.is_clip)
        if self.config.tokens == "answer":
            weights = weights * batch.at_positions([signal.answer_positions[r] for r in batch.rows])
        contrast_hidden = (torch.cat([signal.contrast_hidden[r] for r in batch.rows])
                           if self.config.estimator == "label_contrast" else None)
        return distillation_loss(batch.hidden, batch.weight, teacher_hidden, signal.teacher_weight,
                                 batch.weighted(weights), self.config, batch.tokens, contrast_hidden)


def group_advantages(rollouts: Rollouts, config: GRPOConfig) -> List[float]:
    """``(r - mean) / (std + eps)`` within each group (sample std, as TRL), or ``r - mean`` unscaled."""
    advantages = [0.0] * len(rollouts)
    for members in rollouts.groups:
        rewards = torch.tensor([rollouts.reward[r] for r in members], dtype=torch.float64)
        centred = rewards - rewards.mean()
        if config.scale_rewards:
            std = rewards.std() if len(members) > 1 else torch.zeros((), dtype=torch.float64)
            centred = centred / (std + config.std_eps)
        for r, a in zip(members, centred.tolist()):
            advantages[r] = a
    return advantages


class ClippedPolicyGradient(Objective):
    """GRPO: ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)`` per token, ``ratio = exp(logp - logp_old)``,
    plus ``kl_coef`` times the k3 estimate of KL(student || initial student). Token mean over all rollouts.

    ``logp_old`` is recorded before the first update, so the first ratio is 1 with the gradient of ``logp``.
    """

    name = "grpo"
    needs_teacher = False
    needs_old_logp = True

    def __init__(self, config: GRPOConfig):
        self.config = config
        self.needs_reference = config.kl_coef > 0

    @staticmethod
    def learns_from(rewards: Sequence[float], success: Sequence[bool]) -> bool:
        """Rewards that differ give non-zero advantages, graded ones ([0, .2, .4, 0]) included (DAPO's filter)."""
        return len(set(rewards)) > 1

    def rows(self, rollouts: Rollouts, signal: TrainingSignal) -> Tuple[List[int], List[int]]:
        every = list(range(len(rollouts)))
        if self.config.kl_coef > 0:
            return every, every
        return [r for r in every if signal.advantages[r] != 0], every

    def loss_sum(self, batch: MicroBatch, signal: TrainingSignal) -> torch.Tensor:
        advantage = batch.per_token([signal.advantages[r] for r in batch.rows])
        ratio = (batch.logp - batch.old_logp).exp()
        clipped = ratio.clamp(1 - self.config.clip_eps, 1 + self.config.clip_eps)
        loss = -torch.minimum(ratio * advantage, clipped * advantage)
        if self.config.kl_coef > 0:
            gap = torch.cat([signal.reference_logp[r] for r in batch.rows]) - batch.logp
            loss = loss + self.config.kl_coef * (gap.exp() - gap - 1)
        return batch.weighted(loss).sum()


class SuccessLikelihood(Objective):
    """Rejection-sampling fine-tuning: token negative log-likelihood of the verified successes."""

    name = "sft"
    needs_teacher = False
    needs_old_logp = False

    @staticmethod
    def learns_from(rewards: Sequence[float], success: Sequence[bool]) -> bool:
        return any(success)

    def rows(self, rollouts: Rollouts, signal: TrainingSignal) -> Tuple[List[int], List[int]]:
        successes = [r for r, ok in enumerate(rollouts.success) if ok]
        return successes, successes

    def loss_sum(self, batch: MicroBatch, signal: TrainingSignal) -> torch.Tensor:
        return -batch.weighted(batch.logp).sum()


@dataclass
class PreferencePairs:
    """A step's preference pairs, from the rollouts' log-probabilities before the update: how many, and per rollout
    the derivative of the summed pair losses with respect to its ``h`` (what its gradient is scaled by) and the
    losses of the pairs it is the chosen side of (so that each pair's value is counted once)."""

    count: int
    slope: Dict[int, float]  # rollout in a pair -> d(sum of pair losses) / d h
    chosen_loss: Dict[int, float]  # rollout -> sum of the losses of its pairs as the chosen one
    accuracy: float  # share of pairs with z > 0
    margin: float  # mean h_chosen - h_rejected


def preference_pairs(rollouts: Rollouts, h: Dict[int, float], beta: float, gamma: float,
                     smoothing: float) -> PreferencePairs:
    """Every ordered pair of a group's rollouts with rewards ``r_a > r_b`` (a chosen, b rejected), as the paper's
    code pairs them; ``z = beta * (h_a - h_b) - gamma``, loss ``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)``,
    whose derivative in z is ``sigmoid(z) - (1 - eps)``."""
    slope: Dict[int, float] = {}
    chosen_loss: Dict[int, float] = {}
    margins, wins = [], 0
    for members in rollouts.groups:
        for a in members:
            for b in members:
                if rollouts.reward[a] <= rollouts.reward[b]:
                    continue
                z = torch.tensor(beta * (h[a] - h[b]) - gamma, dtype=torch.float64)
                loss = float(-(1 - smoothing) * F.logsigmoid(z) - smoothing * F.logsigmoid(-z))
                chosen_loss[a] = chosen_loss.get(a, 0.0) + loss
                chosen_loss.setdefault(b, 0.0)
                dz = float(torch.sigmoid(z)) - (1 - smoothing)
                slope[a] = slope.get(a, 0.0) + beta * dz
                slope[b] = slope.get(b, 0.0) - beta * dz
                margins.append(h[a] - h[b])
                wins += bool(z > 0)
    count = len(margins)
    return PreferencePairs(count, slope, chosen_loss, wins / max(count, 1), sum(margins) / max(count, 1))


class PairwisePreference(Objective):
    """DPO (``h`` = summed log-prob minus the reference's) or SimPO (``h`` = mean log-prob, no reference) on every
    pair of a group's rollouts with different rewards; the mean over the step's pairs.

    A pair's loss is not a sum over tokens, and its two rollouts may sit in different micro-batches, or be too long
    to share one: the pairs are scored once before the update (``preference_pairs``, from the student's
    log-probabilities then), and each micro-batch backpropagates ``sum_r slope_r * h_r``, whose gradient is the pair
    loss's exactly, on the step's one update (so ``optim.updates_per_batch`` must be 1).
    """

    needs_teacher = False
    needs_old_logp = False

    def __init__(self, kind: str, config: PreferenceConfig):
        self.name, self.config = kind, config
        self.needs_reference = kind == "dpo"
        self.beta = config.dpo_beta if kind == "dpo" else config.simpo_beta
        self.gamma = 0.0 if kind == "dpo" else config.simpo_gamma

    @staticmethod
    def learns_from(rewards: Sequence[float], success: Sequence[bool]) -> bool:
        return len(set(rewards)) > 1

    def sequence_value(self, logp: torch.Tensor, reference_logp: Optional[torch.Tensor]) -> torch.Tensor:
        """``h`` of one rollout from its tokens' log-probabilities."""
        if self.needs_reference:
            return logp.sum() - reference_logp.sum()
        return logp.sum() / max(logp.numel(), 1)

    def pairs(self, rollouts: Rollouts, policy_logp: Dict[int, torch.Tensor],
              reference_logp: Dict[int, torch.Tensor]) -> PreferencePairs:
        h = {r: float(self.sequence_value(logp, reference_logp.get(r))) for r, logp in policy_logp.items()}
        return preference_pairs(rollouts, h, self.beta, self.gamma, self.config.label_smoothing)

    def rows(self, rollouts: Rollouts, signal: TrainingSignal) -> Tuple[List[int], List[int]]:
        rows = sorted(signal.pairs.slope)
        return rows, rows

    def tokens(self, rollouts: Rollouts, signal: TrainingSignal, rows: Sequence[int]) -> int:
        return signal.pairs.count  # the mean runs over pairs, not tokens

    def loss_sum(self, batch: MicroBatch, signal: TrainingSignal) -> torch.Tensor:
        values = torch.stack([self.sequence_value(logp, signal.reference_logp.get(r))
                              for r, logp in zip(batch.rows, batch.logp.split(batch.lengths))])
        slopes = torch.tensor([signal.pairs.slope[r] for r in batch.rows], dtype=values.dtype, device=values.device)
        surrogate = (slopes * values).sum()
        value = sum(signal.pairs.chosen_loss[r] for r in batch.rows)
        return surrogate - surrogate.detach() + value


def engine_importance_weights(log_ratio: torch.Tensor, lengths: Sequence[int], mode: str, cap: float
                              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights correcting rollouts drawn by a sampling engine whose log-probs differ from the trainer's
    (``log_ratio`` = trainer - engine, per token, rows of ``lengths`` concatenated), and which tokens' ratio
    exceeded ``cap`` (truncated or masked). Sequence modes use each rollout's ratio, the product over its tokens."""
    if mode.startswith("sequence"):
        per_row = torch.stack([part.sum() for part in log_ratio.split(list(lengths))]) if len(lengths) else log_ratio
        log_ratio = torch.repeat_interleave(per_row, torch.tensor(list(lengths), device=log_ratio.device))
    ratio = log_ratio.exp()
    over = ratio > cap
    if mode.endswith("truncate"):
        return ratio.clamp(max=cap), over
    return ratio.masked_fill(over, 0.0), over
