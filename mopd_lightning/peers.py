"""Peer contexts: which other rollouts each rollout's teacher sees, and the teacher prompt they make.

Leave-one-out: rollout ``i`` never sees itself. Peers are drawn uniformly without replacement from a
generator seeded per rollout (seed, step, prompt id, rollout index), so the same seed gives the same contexts
on any rank. Only peers are ever truncated (in the middle, with a visible marker): the question, the closing
instruction and the rollout's own response always reach the teacher whole.

``PeerConfig.context`` also selects the paper's ablation controls (``none``, ``random_peer``,
``unrelated_prompt``, ``swapped_labels``, ``success_only_matched``); each is a different rule for picking
peers and for the label the teacher is shown, nothing else changes.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from .config import PeerConfig
from .data.example import Example
from .rollouts import Rollouts


@dataclass(frozen=True)
class Peer:
    """Another rollout shown to the teacher (an index into the batch's rollouts) and the label it is shown with."""

    rollout: int
    shown_success: bool


def choose_peers(groups: Sequence[Sequence[int]], success: Sequence[bool], config: PeerConfig,
                 seed_keys: Sequence[str]) -> List[List[Peer]]:
    """The peers of every rollout; ``groups[g]`` lists the rollouts of prompt ``g``, seeded by ``seed_keys[g]``."""
    peers: List[List[Peer]] = [[] for _ in success]
    for g, members in enumerate(groups):
        elsewhere = [r for h, other in enumerate(groups) if h != g for r in other if success[r]]
        for k, i in enumerate(members):
            rng = random.Random(f"{seed_keys[g]}:{k}")
            others = [j for j in members if j != i]
            own = [i] if success[i] and not config.dont_reprompt_on_self_success else []
            chosen = _pick(config, others, success, elsewhere, rng, own)
            if not config.require_success or any(p.shown_success for p in chosen):
                peers[i] = chosen
    return peers


def _pick(config: PeerConfig, others: List[int], success: Sequence[bool], elsewhere: List[int],
          rng: random.Random, own: List[int]) -> List[Peer]:
    """One rollout's peers among ``others`` (its group, itself left out) under ``config.context``; ``own`` holds the
    rollout itself when it may be its own success peer (``dont_reprompt_on_self_success`` off)."""
    if config.context == "none":
        return []
    size = config.n_success + config.n_failure
    if config.context == "random_peer":  # the mix's slots filled at random, labelled by slot: labels that say nothing
        return [Peer(j, k < config.n_success) for k, j in enumerate(rng.sample(others, min(size, len(others))))]
    flipped = config.context == "swapped_labels"  # shown as successes: true failures only, never the rollout itself
    successes = [j for j in others if success[j] != flipped] + ([] if flipped else own)
    failures = [j for j in others if success[j] == flipped]
    if config.context == "success_only_matched":
        return [Peer(j, True) for j in rng.sample(successes, min(size, len(successes)))]
    if config.context == "unrelated_prompt":
        successes = elsewhere
    picked = [Peer(j, True) for j in rng.sample(successes, min(config.n_success, len(successes)))]
    if config.failure_when == "always" or not successes:
        picked += [Peer(j, False) for j in rng.sample(failures, min(config.n_failure, len(failures)))]
    return picked


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
    """The teacher's prompt for one rollout (token ids, chat template applied) and what went into it.

    ``active`` is false for a rollout that has no peer to learn from: it gets no distillation signal.
    """

    prompt_ids: List[int]
    peers: List[Peer]
    truncated_peers: int
    active: bool


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


def build_teacher_contexts(batch: Sequence[Example], rollouts: Rollouts, tokenizer, config: PeerConfig,
                           seed_key: str) -> List[TeacherContext]:
    """Teacher prompts for all rollouts of a verified batch, in rollout order.

    With ``context: none`` the teacher reads the student's own prompt. A rollout without any peer gets an
    empty, inactive context.
    """
    if config.context == "none":
        return [TeacherContext(list(ids), [], 0, True) for ids in rollouts.prompt_ids]
    choices = choose_peers(rollouts.groups, rollouts.success, config, [f"{seed_key}:{e.id}" for e in batch])
    truncated: Dict[tuple[int, bool], tuple[str, bool]] = {}  # by (peer, thinking removed): its text, and if cut
    contexts = []
    for r, peers in enumerate(choices):
        if not peers:
            contexts.append(TeacherContext([], [], 0, False))
            continue
        peers = sorted(peers, key=lambda p: not p.shown_success)  # success blocks first, then failures
        keys = [(p.rollout, p.shown_success and config.remove_thinking_from_demonstration) for p in peers]
        for rollout, without_thinking in keys:
            if (rollout, without_thinking) not in truncated:
                ids = _strip_stop(rollouts.response_ids[rollout], tokenizer)
                if without_thinking:
                    ids = tokenizer.encode(remove_thinking(tokenizer.decode(ids, skip_special_tokens=True)),
                                           add_special_tokens=False)
                truncated[rollout, without_thinking] = truncate_middle(ids, config.max_peer_tokens, tokenizer,
                                                                       config.truncation_marker)
        shown = [truncated[key] for key in keys]
        messages = teacher_messages(batch[rollouts.group[r]], [text for text, _ in shown],
                                    [p.shown_success for p in peers], [rollouts.feedback[p.rollout] for p in peers],
                                    config)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        contexts.append(TeacherContext(list(ids), peers, sum(cut for _, cut in shown), True))
    return contexts


THINKING = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)


def remove_thinking(text: str) -> str:
    """``text`` without its ``<think>...</think>`` blocks (an unclosed one stays: there is no telling where it ends)."""
    return THINKING.sub("", text)


def _strip_stop(ids: List[int], tokenizer) -> List[int]:
    return ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else list(ids)
