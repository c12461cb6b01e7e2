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
from dataclasses import dataclass, field, replace
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
                 seed_keys: Sequence[str], lengths: Optional[Sequence[int]] = None) -> List[List[Peer]]:
    """The peers of every rollout; ``groups[g]`` lists the rollouts of prompt ``g``, seeded by ``seed_keys[g]``;
    ``lengths``: each rollout's response length in tokens (``control_match: token``)."""
    peers: List[List[Peer]] = [[] for _ in success]
    matched = config.control_match == "token" and config.context not in ("peers", "none")
    if matched and lengths is None:
        raise ValueError("control_match: token needs the rollouts' lengths")
    for g, members in enumerate(groups):
        elsewhere = [r for h, other in enumerate(groups) if h != g for r in other if success[r]]
        for k, i in enumerate(members):
            seed = f"{seed_keys[g]}:{k}"
            others = [j for j in members if j != i]
            own = [i] if success[i] and not config.dont_reprompt_on_self_success else []
            if matched:
                chosen = _matched(config, others, success, elsewhere, seed, own, lengths)
            else:
                chosen = _pick(config, others, success, elsewhere, random.Random(seed), own)
            if not config.require_success or any(p.shown_success for p in chosen):
                peers[i] = chosen
    return peers


def _matched(config: PeerConfig, others: List[int], success: Sequence[bool], elsewhere: List[int],
             seed: str, own: List[int], lengths: Sequence[int]) -> List[Peer]:
    """A control's peers, slot by slot as the method's own context (``context: peers``, drawn from the same seed)
    fills its slots: each with the unused candidate closest in length to the peer shown there (ties broken at
    random), from the control's candidates for a success slot or a failure slot, and labelled as the slot."""
    real = _pick(replace(config, context="peers"), others, success, elsewhere, random.Random(seed), own)
    rng = random.Random(f"{seed}:matched")
    flipped = config.context == "swapped_labels"
    if config.context == "random_peer":
        candidates = {True: others, False: others}
    elif config.context == "success_only_matched":
        successes = [j for j in others if success[j]] + own
        candidates = {True: successes, False: successes}
    else:  # unrelated_prompt, swapped_labels
        failures = [j for j in others if success[j] == flipped]
        successes = elsewhere if config.context == "unrelated_prompt" else [j for j in others if success[j] != flipped]
        candidates = {True: successes, False: failures}
    used: set = set()
    picked = []
    for peer in real:
        pool = [j for j in candidates[peer.shown_success] if j not in used]
        rng.shuffle(pool)
        if not pool:
            continue
        best = min(pool, key=lambda j: abs(lengths[j] - lengths[peer.rollout]))
        used.add(best)
        picked.append(Peer(best, peer.shown_success or config.context == "success_only_matched"))
    return picked


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
    summarized: List[Peer] = field(default_factory=list)  # peers shown by their summary (``summaries``)
    summary_fallbacks: int = 0  # of those, peers without a summary, shown by the start of their response


# -- solution summaries (the reference's shipped default) -----------------------------------------------------
def with_summary_request(messages: List[Dict[str, str]], config: PeerConfig) -> List[Dict[str, str]]:
    """The prompt with ``summary_instruction`` appended to its last user turn when summaries are on: what the
    student reads, and the question its teacher restates."""
    if config.summaries == "off":
        return messages
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    request = fill(config.summary_instruction, tag=config.summary_tag)
    return [dict(m, content=m["content"] + request) if i == last else m for i, m in enumerate(messages)]


def summary_of(text: str, config: PeerConfig) -> tuple[str, bool]:
    """A response's summary (its first ``<tag>...</tag>``, stripped) and whether it had none: then the start of the
    response stands in for it (``summary_fallback_chars``)."""
    tag = re.escape(config.summary_tag)
    found = re.search(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
    if found and found.group(1).strip():
        return found.group(1).strip(), False
    return text.strip()[: config.summary_fallback_chars], True


def choose_summaries(groups: Sequence[Sequence[int]], success: Sequence[bool], shown: Sequence[Sequence[Peer]],
                     config: PeerConfig, seed_keys: Sequence[str]) -> List[List[Peer]]:
    """The peers each rollout's teacher sees by their summary: ``summary_k`` of the group's successes, failures or
    all (``summaries``), never the rollout itself (with ``dont_reprompt_on_self_success``, as the reference) nor a
    peer shown whole; labelled with their outcome."""
    chosen: List[List[Peer]] = [[] for _ in success]
    if config.summaries == "off" or config.summary_k == 0:
        return chosen
    for g, members in enumerate(groups):
        for k, i in enumerate(members):
            rng = random.Random(f"{seed_keys[g]}:{k}:summaries")
            whole = {p.rollout for p in shown[i]}
            pool = [j for j in members if j not in whole and (j != i or not config.dont_reprompt_on_self_success)
                    and (config.summaries == "all" or success[j] == (config.summaries == "success"))]
            chosen[i] = [Peer(j, success[j]) for j in rng.sample(pool, min(config.summary_k, len(pool)))]
    return chosen


def summary_blocks(rollouts: Rollouts, summarized: Sequence[Peer], config: PeerConfig) -> tuple[str, int]:
    """The summaries' text for a context, and how many were stood in for by the start of their response."""
    blocks, fallbacks = [], 0
    for peer in summarized:
        text, fallback = summary_of(rollouts.response_text[peer.rollout], config)
        fallbacks += fallback
        template = config.summary_success_template if peer.shown_success else config.summary_failure_template
        blocks.append(fill(template, summary=text))
    return "".join(blocks), fallbacks


def teacher_messages(example: Example, peer_texts: List[str], peer_success: List[bool],
                     peer_feedback: List[Optional[str]], config: PeerConfig, own_feedback: str = "",
                     summaries: str = "") -> List[Dict[str, str]]:
    """Original system turns, then one user turn: question, success blocks, failure blocks, peers' summaries, the
    rollout's own feedback block (``self_feedback``), closing instruction; without any peer, the question and the
    feedback."""
    blocks = []
    for text, success, feedback in zip(peer_texts, peer_success, peer_feedback):
        block = fill(config.success_template if success else config.failure_template, response=text)
        if config.include_feedback and feedback:
            block += fill(config.feedback_template, feedback=feedback)
        blocks.append(block)
    blocks.append(summaries)
    if any(blocks):
        content = fill(config.context_template, question=example.question, peers="".join(blocks),
                       feedback=own_feedback)
    else:
        content = fill(config.feedback_only_template, question=example.question, feedback=own_feedback)
    return example.system_messages + [{"role": "user", "content": content}]


def own_feedback(rollouts: Rollouts, r: int, peers: Sequence[Peer], tokenizer, config: PeerConfig) -> str:
    """The block of rollout ``r``'s own verifier feedback for its teacher (``self_feedback``), or "" when it has
    none or the setting leaves it out (``without_success``: when a success is shown); cut to ``max_peer_tokens``."""
    feedback = (rollouts.feedback[r] if rollouts.feedback else None) or ""
    if config.self_feedback == "never" or not feedback.strip():
        return ""
    if config.self_feedback == "without_success" and any(p.shown_success for p in peers):
        return ""
    text, _ = truncate_middle(tokenizer.encode(feedback.strip(), add_special_tokens=False), config.max_peer_tokens,
                              tokenizer, config.truncation_marker)
    return fill(config.self_feedback_template, feedback=text)


def build_teacher_contexts(batch: Sequence[Example], rollouts: Rollouts, tokenizer, config: PeerConfig,
                           seed_key: str) -> List[TeacherContext]:
    """Teacher prompts for all rollouts of a verified batch, in rollout order.

    With ``context: none`` the teacher reads the student's own prompt. A rollout without any peer gets an
    empty, inactive context. With ``self_feedback``, a rollout's own feedback joins its context, and a rollout with
    feedback but no peers gets a context of its feedback alone.
    """
    seed_keys = [f"{seed_key}:{e.id}" for e in batch]
    if config.context == "none":
        choices = [[] for _ in rollouts.prompt_ids]
    else:
        choices = choose_peers(rollouts.groups, rollouts.success, config, seed_keys,
                               [len(ids) for ids in rollouts.response_ids])
    summarized = choose_summaries(rollouts.groups, rollouts.success, choices, config, seed_keys)
    asked = [replace(e, messages=with_summary_request(e.messages, config)) for e in batch]
    truncated: Dict[tuple[int, bool], tuple[str, bool]] = {}  # by (peer, thinking removed): its text, and if cut
    contexts = []
    for r, peers in enumerate(choices):
        feedback = own_feedback(rollouts, r, peers, tokenizer, config)
        summaries, fallbacks = summary_blocks(rollouts, summarized[r], config)
        if not peers and not summaries and not feedback:
            plain = config.context == "none"  # the student's own prompt, or no context at all
            contexts.append(TeacherContext(list(rollouts.prompt_ids[r]) if plain else [], [], 0, plain))
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
        messages = teacher_messages(asked[rollouts.group[r]], [text for text, _ in shown],
                                    [p.shown_success for p in peers], [rollouts.feedback[p.rollout] for p in peers],
                                    config, feedback, summaries)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        contexts.append(TeacherContext(list(ids), peers, sum(cut for _, cut in shown), True, summarized[r],
                                       fallbacks))
    return contexts


THINKING = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)


def remove_thinking(text: str) -> str:
    """``text`` without its ``<think>...</think>`` blocks (an unclosed one stays: there is no telling where it ends)."""
    return THINKING.sub("", text)


def _strip_stop(ids: List[int], tokenizer) -> List[int]:
    return ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else list(ids)
