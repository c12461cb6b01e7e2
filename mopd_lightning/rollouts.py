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
        return sum(map(self.is_mixed, groups)) / max(len(groups), 1)

    def is_mixed(self, members: Sequence[int]) -> bool:
        return len({self.success[r] for r in members}) == 2

    @classmethod
    def from_groups(cls, parts: Sequence[tuple["Rollouts", int]]) -> "Rollouts":
        """The rollouts of the given ``(rollouts, group)`` pairs, in that order, as one batch (groups renumbered)."""
        fields = ("prompt_ids", "response_ids", "response_text", "finished", "entropy", "sample_logp", "reward",
                  "success", "feedback")
        out = cls([], [], [], [], [])
        groups = {id(rollouts): rollouts.groups for rollouts, _ in parts}
        for new_group, (rollouts, group) in enumerate(parts):
            members = groups[id(rollouts)][group]
            out.group += [new_group] * len(members)
            for name in fields:
                values = getattr(rollouts, name)
                if values:  # optional fields stay empty when the sampler did not fill them
                    getattr(out, name).extend(values[r] for r in members)
        return out

    def tokens(self, rows: Sequence[int]) -> int:
        return sum(len(self.response_ids[r]) for r in rows)
