"""Where the answer is in a response: the tokens that spell what the verifier read (the letter, the last
``\\boxed{}``, the program), the end-of-turn token of a finished rollout, and the rest. The analysis scores each
part apart; ``model.loss.tokens: answer`` distils on the answer alone. For a multiple-choice question, also which
token at the answer's first position would have named each option (:func:`choice_targets`), so that the analysis
can say how much mass the teacher puts on the right option, against the student."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .config import ConfigError
from .data.example import Example
from .rewards.named import named_options, read_ground_truth
from .rewards.registry import ANSWER_SPANS
from .rewards.sci import extract_choice
from .rollouts import Rollouts

PARTS = ("answer", "rest", "end")
_OPTION_LINE = re.compile(r"^([A-J])[.)] ", re.MULTILINE)


def response_parts(tokenizer, response_ids: Sequence[int], finished: bool,
                   span: Optional[Tuple[int, int]]) -> Dict[str, List[int]]:
    """The token positions of each part of one response: a token is in the answer when the characters it decodes
    to overlap ``span`` (character offsets in the response's text).

    The decoded length of a prefix grows with the prefix, so the span's first token is found by bisection and only
    the tokens up to its end are decoded one by one: O(log n + answer) decodes, not O(n), so that scoring the
    answer every training step stays cheap on 4096-token responses."""
    end = [len(response_ids) - 1] if finished and response_ids else []
    body = len(response_ids) - len(end)
    answer: List[int] = []
    if span and body:
        def decoded(k: int) -> int:  # characters of the first k tokens
            return len(tokenizer.decode(response_ids[:k], skip_special_tokens=True)) if k else 0

        low, high = 0, body  # the first token whose prefix reaches past span[0]
        while low < high:
            middle = (low + high) // 2
            if decoded(middle + 1) > span[0]:
                high = middle
            else:
                low = middle + 1
        before = decoded(low)
        for k in range(low, body):
            if before >= span[1]:
                break
            upto = decoded(k + 1)
            if upto > before and upto > span[0]:
                answer.append(k)
            before = upto
    taken = set(answer) | set(end)
    return {"answer": answer, "rest": [k for k in range(len(response_ids)) if k not in taken], "end": end}


def check_answer_spans(domains: Iterable[str]) -> None:
    """``model.loss.tokens: answer`` distils on the answer span alone: a domain whose verifier names no span would
    give every rollout an empty loss, and the run would train nothing without a word."""
    missing = sorted(d for d in domains if d not in ANSWER_SPANS)
    if missing:
        raise ConfigError(f"model.loss.tokens: answer distils on the answer span, and the verifier of domain "
                          f"{', '.join(missing)} names none (spans exist for {', '.join(sorted(ANSWER_SPANS))}); "
                          "set model.loss.tokens: all, or add the domain to rewards.registry.ANSWER_SPANS")


def rollout_parts(batch: Sequence[Example], rollouts: Rollouts, tokenizer, strict: bool,
                  rows: Sequence[int]) -> Dict[int, Dict[str, List[int]]]:
    """The parts of each rollout in ``rows``, its answer span read as its prompt's verifier reads it (a domain
    without an answer span has none)."""
    parts = {}
    for r in rows:
        example = batch[rollouts.group[r]]
        find_span = ANSWER_SPANS.get(example.verifier)
        span = find_span(rollouts.response_text[r], strict, example.ground_truth) if find_span else None
        parts[r] = response_parts(tokenizer, rollouts.response_ids[r], rollouts.finished[r], span)
    return parts


@dataclass(frozen=True)
class ChoiceTarget:
    """At ``position`` (the first token of a rollout's answer), the token that would name each option in the place
    of the one written (``options[i]`` names ``labels[i]``: a letter, or an option's name); ``right`` indexes the
    right one."""

    position: int
    options: List[int]
    labels: Tuple[str, ...]
    right: int


def _letter_target(example: Example, response: str, written_id: int, tokenizer, strict: bool,
                   position: int) -> Optional[ChoiceTarget]:
    """A letter answer (options listed as ``A. ...`` lines): the written token with its letter replaced, where each
    is one token."""
    if not isinstance(example.ground_truth, str):
        return None
    right = example.ground_truth.strip().upper()
    letters = tuple(dict.fromkeys(_OPTION_LINE.findall(example.question)))
    chosen = extract_choice(response, strict)
    written = tokenizer.decode([written_id])
    if right not in letters or not chosen or chosen not in letters or written.count(chosen) != 1:
        return None
    options = [tokenizer.encode(written.replace(chosen, letter), add_special_tokens=False) for letter in letters]
    if all(len(ids) == 1 for ids in options) and len({ids[0] for ids in options}) == len(letters):
        return ChoiceTarget(position, [ids[0] for ids in options], letters, letters.index(right))
    return None


def _name_target(example: Example, response: str, span: Tuple[int, int], written_id: int, tokenizer,
                 position: int) -> Optional[ChoiceTarget]:
    """A named answer: the first token of each option's name after what the written token holds before the name
    (a space, say); kept where the chosen name gives back the written token and the options' tokens all differ."""
    try:
        right, names = read_ground_truth(example.ground_truth)
    except ValueError:
        return None
    chosen = named_options(response[span[0]:span[1]], names)
    written = tokenizer.decode([written_id])
    if len(chosen) != 1:
        return None
    start = next((i for i in range(len(written)) if chosen[0].lower().startswith(written[i:].lower())), None)
    if start is None:
        return None
    firsts = [tokenizer.encode(written[:start] + name, add_special_tokens=False)[0] for name in names]
    if firsts[names.index(chosen[0])] != written_id or len(set(firsts)) != len(names):
        return None
    return ChoiceTarget(position, firsts, tuple(names), names.index(right))


def choice_targets(batch: Sequence[Example], rollouts: Rollouts, tokenizer, parts: Dict[int, Dict[str, List[int]]],
                   strict: bool) -> Dict[int, ChoiceTarget]:
    """For each rollout of a multiple-choice prompt (a letter answer, or a name: verifier ``named``) whose answer's
    first token starts the option it chose: the token of every option at that place. Rollouts without one are
    left out."""
    targets = {}
    for r, rollout_parts in parts.items():
        example = batch[rollouts.group[r]]
        if not rollout_parts["answer"] or example.verifier not in ("sci", "named"):
            continue
        position = rollout_parts["answer"][0]
        response, written_id = rollouts.response_text[r], rollouts.response_ids[r][position]
        if example.verifier == "sci":
            target = _letter_target(example, response, written_id, tokenizer, strict, position)
        else:
            span = ANSWER_SPANS["named"](response, strict, example.ground_truth)
            target = span and _name_target(example, response, span, written_id, tokenizer, position)
        if target:
            targets[r] = target
    return targets
