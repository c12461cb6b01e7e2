"""Where the answer is in a response: the tokens that spell what the verifier read (the letter, the last
``\\boxed{}``, the program), the end-of-turn token of a finished rollout, and the rest. The analysis scores each
part apart; ``model.loss.tokens: answer`` distils on the answer alone."""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .config import ConfigError
from .data.example import Example
from .rewards.registry import ANSWER_SPANS
from .rollouts import Rollouts

PARTS = ("answer", "rest", "end")


def response_parts(tokenizer, response_ids: Sequence[int], finished: bool,
                   span: Optional[Tuple[int, int]]) -> Dict[str, List[int]]:
    """The token positions of each part of one response: a token is in the answer when the characters it decodes
    to overlap ``span`` (character offsets in the response's text)."""
    end = [len(response_ids) - 1] if finished and response_ids else []
    answer, before = [], 0
    for k in range(len(response_ids) - len(end)) if span else ():
        upto = len(tokenizer.decode(response_ids[:k + 1], skip_special_tokens=True))
        if upto > before and before < span[1] and upto > span[0]:
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
        find_span = ANSWER_SPANS.get(batch[rollouts.group[r]].verifier)
        span = find_span(rollouts.response_text[r], strict) if find_span else None
        parts[r] = response_parts(tokenizer, rollouts.response_ids[r], rollouts.finished[r], span)
    return parts
