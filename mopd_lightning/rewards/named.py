"""Answers given by name (verifier ``named``): the response names one of the listed options, not its letter.

Why a second multiple-choice reader: under letters, which letter is right is uniform over a task's questions, so a
policy that always writes one letter loses nothing against the rest and no group it samples is mixed; training
collapses onto it (the letter form of ``facts_few``, README "Does MOPD teach?"). Named, an option is a different
string on every question, and a model can only be right more often than chance by knowing which.

The ground truth is ``{"answer": name, "options": [names]}``. A response succeeds when it names exactly one of the
options (whole words, case-insensitive: "Orfen" is not named by "Corfen") and that one is the answer; a response
naming several, none, or a misspelling fails. Strict reads the text of the last ``<answer>...</answer>`` only;
lenient reads that tag where there is one, else the whole response.
"""

from __future__ import annotations

import re
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from .base import Score
from .sci import answer_tag_span, last_answer_tag


def _mention(name: str) -> "re.Pattern[str]":
    return re.compile(rf"(?<!\w){re.escape(name)}(?!\w)", re.IGNORECASE)


def named_options(text: str, options: Sequence[str]) -> List[str]:
    """The options that ``text`` names, as whole words, in the order they are listed."""
    return [name for name in options if _mention(name).search(text)]


def read_ground_truth(ground_truth: Any) -> tuple[str, List[str]]:
    """(answer, options) of a named answer's ground truth; ValueError naming what is wrong."""
    if not isinstance(ground_truth, Mapping):
        raise ValueError("a named answer's ground truth is {'answer': name, 'options': [names]}")
    answer, options = ground_truth.get("answer"), ground_truth.get("options")
    if not isinstance(answer, str) or not isinstance(options, (list, tuple)) or answer not in options:
        raise ValueError("a named answer's ground truth is {'answer': name, 'options': [names]}, answer among them")
    if not all(isinstance(name, str) and name.strip() for name in options):
        raise ValueError("a named answer's options must be non-empty strings")
    return answer, list(options)


def verify_named(response: str, ground_truth: Any, strict: bool = True) -> Score:
    """Reward 1 when the response names exactly one option and it is ``ground_truth["answer"]``."""
    try:
        answer, options = read_ground_truth(ground_truth)
    except ValueError as error:  # an odd ground truth scores 0, it never raises
        return Score(0.0, f"Invalid ground truth: {error}.")
    if not isinstance(response, str):
        return Score(0.0, "No answer found.")
    tag = last_answer_tag(response)
    if tag is None and strict:
        return Score(0.0, "No answer found: the final answer must be written as <answer>name</answer>.")
    named = named_options(response if tag is None else tag, options)
    if named == [answer]:
        return Score(1.0, None)
    if not named:
        return Score(0.0, "The answer names none of the options.")
    if len(named) > 1:
        return Score(0.0, f"The answer names {len(named)} options at once.")
    return Score(0.0, f"The answer {named[0]} is incorrect.")


def verify_named_lenient(response: str, ground_truth: Any) -> Score:
    """:func:`verify_named` that reads a response without an answer tag as a whole."""
    return verify_named(response, ground_truth, strict=False)


def answer_span(response: str, strict: bool, ground_truth: Any) -> Optional[Tuple[int, int]]:
    """Where the verifier read the answer: the last answer tag's text; untagged (lenient), the last mention of the
    one option the response names. None where it reads no answer, or (untagged) several options."""
    span = answer_tag_span(response)
    if span is not None or strict:
        return span
    try:
        _, options = read_ground_truth(ground_truth)
    except ValueError:
        return None
    named = named_options(response, options)
    if len(named) != 1:
        return None
    *_, last = _mention(named[0]).finditer(response)
    return last.span()


verify_named.executor = verify_named_lenient.executor = "inline"
