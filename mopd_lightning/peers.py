"""Peer contexts: which other rollouts each rollout's teacher sees, and the teacher prompt they make.

Leave-one-out: rollout ``i`` never sees itself (unless ``dont_reprompt_on_self_success`` is off, which lets a
success be its own success peer in the method's context and in ``success_only_matched``). Peers are drawn uniformly
without replacement from a generator seeded per rollout (seed, step, prompt id, rollout index), so the same seed gives the same contexts
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


@dataclass(frozen=True)
class _Source:
    """Where up to ``count`` of a context's peers come from, and the label they are shown with (``None``:
    ``random_peer``'s labels, which say nothing about the peer)."""

    label: Optional[bool]
    candidates: List[int]
    count: int


def choose_peers(groups: Sequence[Sequence[int]], success: Sequence[bool], config: PeerConfig,
                 seed_keys: Sequence[str], lengths: Optional[Sequence[int]] = None) -> List[List[Peer]]:
    """The peers of every rollout; ``groups[g]`` lists the rollouts of prompt ``g``, seeded by ``seed_keys[g]``;
    ``lengths``: each rollout's response length in tokens (``control_match: token``). ``require_success`` is applied
    later, once the summaries are known (``build_teacher_contexts``)."""
    peers: List[List[Peer]] = [[] for _ in success]
    matched = config.control_match == "token" and config.context not in ("peers", "none")
    if matched and lengths is None:
        raise ValueError("control_match: token needs the rollouts' lengths")
    for g, members in enumerate(groups):
        elsewhere = [r for h, other in enumerate(groups) if h != g for r in other]
        for k, i in enumerate(members):
            seed = f"{seed_keys[g]}:{k}"
            others = [j for j in members if j != i]
            own = [i] if success[i] and not config.dont_reprompt_on_self_success else []
            sources = _sources(config, others, success, elsewhere, own)
            if matched:
                method = _sources(replace(config, context="peers"), others, success, elsewhere, own)
                peers[i] = _matched(config, sources, _drawn(config, method, random.Random(seed)), seed, lengths)
            else:
                peers[i] = _drawn(config, sources, random.Random(seed))
    return peers


def _sources(config: PeerConfig, others: List[int], success: Sequence[bool], elsewhere: List[int],
             own: List[int]) -> List[_Source]:
    """Where one rollout's peers come from under ``config.context``: ``others`` are its group without it,
    ``elsewhere`` the other prompts' rollouts, ``own`` the rollout itself when it may be its own success peer
    (``dont_reprompt_on_self_success`` off: the method and ``success_only_matched`` only)."""
    if config.context == "none":
        return []
    if config.context == "random_peer":  # the mix's slots filled ignoring the verifier: labels that say nothing
        return [_Source(None, others, config.n_success + config.n_failure)]
    if config.context == "success_only_matched":
        return [_Source(True, [j for j in others if success[j]] + own, config.n_success + config.n_failure)]
    unrelated = config.context == "unrelated_prompt"  # a mix of the other prompts' rollouts, labelled truly
    pool = elsewhere if unrelated else others
    flipped = config.context == "swapped_labels"  # shown as successes: true failures only, never the rollout itself
    successes = [j for j in pool if success[j] != flipped] + ([] if flipped or unrelated else own)
    failures = [j for j in pool if success[j] == flipped]
    sources = [_Source(True, successes, config.n_success)]
    if config.failure_when == "always" or not successes:
        sources.append(_Source(False, failures, config.n_failure))
    return sources


def _drawn(config: PeerConfig, sources: List[_Source], rng: random.Random) -> List[Peer]:
    """Peers drawn at random from each source in turn (``control_match: block``); ``random_peer``'s labelled by
    position, the first ``n_success`` as successes, as the reference fills its 2S1F slots."""
    picked = []
    for source in sources:
        for k, j in enumerate(rng.sample(source.candidates, min(source.count, len(source.candidates)))):
            picked.append(Peer(j, k < config.n_success if source.label is None else source.label))
    return picked


def _matched(config: PeerConfig, sources: List[_Source], method: List[Peer], seed: str,
             lengths: Sequence[int]) -> List[Peer]:
    """A control's peers matched to the method's own context (``method``, drawn from the same seed), slot by slot:
    each slot takes the unused candidate closest in length to the peer the method shows there (ties broken at
    random), from a source with the slot's label while one has room, else from any source that has. So a control
    holds as many peers as the method's context, of about its lengths, unless its candidates run out.

    ``random_peer`` then shuffles its labels over the peers it took: those peers are the method's own where lengths
    do not tie, so labels kept by slot would be the verifier's."""
    rng = random.Random(f"{seed}:matched")
    room = [source.count for source in sources]
    used: set = set()
    picked = []
    for slot in method:
        preferred = sorted(range(len(sources)), key=lambda s: sources[s].label not in (None, slot.shown_success))
        for s in preferred:
            pool = [j for j in sources[s].candidates if j not in used] if room[s] else []
            if pool:
                rng.shuffle(pool)
                best = min(pool, key=lambda j: abs(lengths[j] - lengths[slot.rollout]))
                used.add(best)
                room[s] -= 1
                picked.append(Peer(best, sources[s].label))
                break
    if any(peer.shown_success is None for peer in picked):
        labels = [k < config.n_success for k in range(len(picked))]
        rng.shuffle(labels)
        picked = [Peer(peer.rollout, label) for peer, label in zip(picked, labels)]
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
    all (``summaries``), labelled with their outcome; never a peer shown whole, nor the rollout itself, whatever
    ``dont_reprompt_on_self_success`` says: a failure shown its own summary would be told its own outcome."""
    chosen: List[List[Peer]] = [[] for _ in success]
    if config.summaries == "off" or config.summary_k == 0:
        return chosen
    for g, members in enumerate(groups):
        for k, i in enumerate(members):
            rng = random.Random(f"{seed_keys[g]}:{k}:summaries")
            whole = {p.rollout for p in shown[i]}
            pool = [j for j in members if j not in whole and j != i
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
                           seed_key: str, swap_labels: bool = False) -> List[TeacherContext]:
    """Teacher prompts for all rollouts of a verified batch, in rollout order.

    With ``context: none`` the teacher reads the student's own prompt. A rollout without any peer gets an
    empty, inactive context. With ``self_feedback``, a rollout's own feedback joins its context, and a rollout with
    feedback but no peers gets a context of its feedback alone. With ``require_success``, a rollout shown no
    success, whole or by its summary, is shown nothing: no peers, no summaries, no feedback.

    ``swap_labels``: the same contexts with every peer and summary shown under the other label (the wrong hint of
    ``model.loss.estimator: label_contrast``): the same texts in the same places, the same feedback; only the
    labels' words differ.
    """
    seed_keys = [f"{seed_key}:{e.id}" for e in batch]
    if config.context == "none":
        choices = [[] for _ in rollouts.prompt_ids]
    else:
        choices = choose_peers(rollouts.groups, rollouts.success, config, seed_keys,
                               [len(ids) for ids in rollouts.response_ids])
    summarized = choose_summaries(rollouts.groups, rollouts.success, choices, config, seed_keys)
    if config.require_success:  # no success shown, whole or summarised: no peers, no summaries, no feedback
        for r, shown in enumerate(choices):
            if not any(p.shown_success for p in shown + summarized[r]):
                choices[r], summarized[r] = [], []
    asked = [replace(e, messages=with_summary_request(e.messages, config)) for e in batch]
    truncated: Dict[tuple[int, bool], tuple[str, bool]] = {}  # by (peer, thinking removed): its text, and if cut
    contexts = []
    for r, peers in enumerate(choices):
        gated = config.require_success and not peers and not summarized[r]
        feedback = "" if gated else own_feedback(rollouts, r, peers, tokenizer, config)
        if swap_labels:
            summarized[r] = _swapped(summarized[r])
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
        if swap_labels:  # after the order, the thinking removed and the feedback: those follow the true labels
            peers = _swapped(peers)
        messages = teacher_messages(asked[rollouts.group[r]], [text for text, _ in shown],
                                    [p.shown_success for p in peers], [rollouts.feedback[p.rollout] for p in peers],
                                    config, feedback, summaries)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        contexts.append(TeacherContext(list(ids), peers, sum(cut for _, cut in shown), True, summarized[r],
                                       fallbacks))
    return contexts


def _swapped(peers: Sequence[Peer]) -> List[Peer]:
    return [Peer(p.rollout, not p.shown_success) for p in peers]


THINKING = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)


def remove_thinking(text: str) -> str:
    """``text`` without its ``<think>...</think>`` blocks (an unclosed one stays: there is no telling where it ends)."""
    return THINKING.sub("", text)


def _strip_stop(ids: List[int], tokenizer) -> List[int]:
    return ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else list(ids)
