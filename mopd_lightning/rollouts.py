"""Rollouts: a batch of groups, flattened, that knows its groups and (once verified) its successes.

Rollout ``r`` answers prompt ``group[r]``. Sampling fills the token fields (and ``entropy``: the sum over the
response's positions of the student's next-token entropy, when sampled; ``sample_logp``: the sampler's
log-probability of each response token, when the sampler is a separate engine); verification fills ``reward``,
``success`` and ``feedback``. Success is decided here once, by the reward threshold, and everything
downstream (peer contexts, advantages, pass@k, the analysis) reads ``success`` rather than deciding again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from .rewards.base import Score


@dataclass
class Rollouts:
    group: List[int]
    prompt_ids: List[List[int]]
    response_ids: List[List[int]]
    response_text: List[str]
    finished: List[bool]
    entropy: List[float] = field(default_factory=list)
    sample_logp: List[List[float]] = field(default_factory=list)
    reward: List[float] = field(default_factory=list)
    success: List[bool] = field(default_factory=list)
    feedback: List[Optional[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.group)

    @property
    def groups(self) -> List[List[int]]:
        """Rollout indices of each group, groups in prompt order, rollouts in sampling order."""
        members: List[List[int]] = [[] for _ in range(max(self.group, default=-1) + 1)]
        for r, g in enumerate(self.group):
            members[g].append(r)
        return members

    def record_scores(self, scores: Sequence[Score], success_threshold: float) -> None:
        """Store the verifier's verdicts; a rollout succeeds when its reward reaches ``success_threshold``."""
        if len(scores) != len(self):
            raise ValueError(f"{len(scores)} scores for {len(self)} rollouts")
        self.reward = [float(s.reward) for s in scores]
        self.success = [s.reward >= success_threshold for s in scores]
        self.feedback = [s.feedback for s in scores]

    @property
    def mixed_group_fraction(self) -> float:
        """Share of groups holding both a success and a failure (the groups with a contrast to learn from)."""
        groups = self.groups
        mixed = [len({self.success[r] for r in members}) == 2 for members in groups]
        return sum(mixed) / max(len(groups), 1)

    def tokens(self, rows: Sequence[int]) -> int:
        return sum(len(self.response_ids[r]) for r in rows)
