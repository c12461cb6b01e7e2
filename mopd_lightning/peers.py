"""Peer contexts: which other rollouts of its group each rollout's teacher sees, and the teacher prompt.

Leave-one-out: rollout ``i`` never sees itself. Peers are drawn uniformly without replacement from a
generator seeded per rollout, so the same seed gives the same contexts on any rank. Only peers are ever
truncated (in the middle, with a visible marker): the question, the closing instruction and the rollout's
own response always reach the teacher whole.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from .config import PeerConfig
from .data.example import Example


@dataclass
class PeerChoice:
    """The peers chosen for one rollout, as indices into its group."""

    successes: List[int]
    failures: List[int]

    @property
    def count(self) -> int:
        return len(self.successes) + len(self.failures)


def choose_peers(is_success: Sequence[bool], config: PeerConfig, seed_key: str) -> List[PeerChoice]:
    """For every rollout of one group, up to ``n_success`` other successes and ``n_failure`` other failures."""
    choices = []
    for i in range(len(is_success)):
        rng = random.Random(f"{seed_key}:{i}")
        successes = [j for j, ok in enumerate(is_success) if ok and j != i]
        failures = [j for j, ok in enumerate(is_success) if not ok and j != i]
        picked_successes = rng.sample(successes, min(config.n_success, len(successes)))
        failures_allowed = config.failure_when == "always" or not successes
        picked_failures = rng.sample(failures, min(config.n_failure, len(failures))) if failures_allowed else []
        choices.append(PeerChoice(picked_successes, picked_failures))
    return choices


def fill(template: str, **values: str) -> str:
    """Substitute ``{name}`` fields in one pass; braces inside the values (code, LaTeX) are left alone."""
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), template)


def truncate_middle(token_ids: Sequence[int], budget: int, tokenizer, marker: str) -> tuple[str, bool]:
    """The text of ``token_ids`` cut to ``budget`` tokens by dropping the middle; and whether it was cut."""
    if len(token_ids) <= budget:
        return tokenizer.decode(token_ids, skip_special_tokens=True), False
    head = budget // 2
    tail = budget - head
    text = (tokenizer.decode(token_ids[:head], skip_special_tokens=True)
            + fill(marker, n=str(len(token_ids) - budget))
            + tokenizer.decode(token_ids[len(token_ids) - tail:], skip_special_tokens=True))
    return text, True


@dataclass
class TeacherContext:
    """The teacher's prompt for one rollout (token ids, chat template applied) and what went into it."""

    prompt_ids: List[int]
    peers: PeerChoice
    truncated_peers: int

    @property
    def active(self) -> bool:
        return self.peers.count > 0


def teacher_messages(example: Example, peer_texts: List[str], peer_success: List[bool],
                     peer_feedback: List[Optional[str]], config: PeerConfig) -> List[Dict[str, str]]:
    """Original system turns, then one user turn: question, success blocks, failure blocks, closing instruction."""
    blocks = []
    for text, success, feedback in zip(peer_texts, peer_success, peer_feedback):
        block = fill(config.success_template if success else config.failure_template, response=text)
        if config.include_feedback and feedback:
            block += fill(config.feedback_template, feedback=feedback)
        blocks.append(block)
    content = fill(config.context_template, question=example.question, peers="".join(blocks))
    return example.system_messages + [{"role": "user", "content": content}]


def build_teacher_contexts(example: Example, response_ids: List[List[int]], is_success: List[bool],
                           feedback: List[Optional[str]], tokenizer, config: PeerConfig,
                           seed_key: str) -> List[TeacherContext]:
    """Teacher prompts for all rollouts of one group (rollouts without any peer get an empty, inactive one)."""
    truncated = [truncate_middle(_strip_stop(ids, tokenizer), config.max_peer_tokens, tokenizer,
                                 config.truncation_marker) for ids in response_ids]
    contexts = []
    for choice in choose_peers(is_success, config, seed_key):
        if choice.count == 0:
            contexts.append(TeacherContext([], choice, 0))
            continue
        order = choice.successes + choice.failures
        messages = teacher_messages(example, [truncated[j][0] for j in order], [is_success[j] for j in order],
                                    [feedback[j] for j in order], config)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        contexts.append(TeacherContext(list(ids), choice, sum(truncated[j][1] for j in order)))
    return contexts


def _strip_stop(ids: List[int], tokenizer) -> List[int]:
    return ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else list(ids)
