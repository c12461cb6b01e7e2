"""Science multiple-choice verifier (domain ``sci``): the answer is the choice inside the last
``<answer>...</answer>`` tag.

Covers SciKnowEval's ``mcq-4-choices``, ``mcq-2-choices`` and ``true_or_false`` types. The ground truth is a
letter (``"B"``), a truth value (``"Yes"``/``"No"``, ``"true"``/``"false"``, a bool), or a dict holding one of
those under ``answerKey``/``answer``/``label`` plus, optionally, the question's ``choices``
(``{"label": [...], "text": [...]}``): then an answer written as an option's text counts as that option's
label, so ``True`` answers a true/false question whose options are ``A: True, B: False``.

Yes/true and no/false are the same answer. Strict (the default, and the reference implementation's rule): only
the tag the prompt asks for counts. Lenient: without a tag, a response is still read when it is nothing but a
choice (``"B"``, ``"Yes."``, as SciKnowEval's own prompts ask), states one ("the answer is B", "Answer: B",
``\boxed{B}``, as the 0.5B coder writes) or starts a line with an option label (``"B. 120 N"``), as small models
often answer; a 135M model's "successes" are then mostly such guesses. The options restated line by line are not an
answer (a listing with no statement after it names none), and a response that names more than one choice ("C.
Quarel\nAnswer: D", a tag holding "A or B", a hedge such as "the answer is A or B", "Answer: A/B", ``\boxed{A, C}``)
is not read as any, in either mode: a two-letter hedge would succeed half the time and show the teacher a peer
labelled correct that is not. A stated letter is a capital one ("the answer is a compound" names no choice).
"""

from __future__ import annotations

import re
from typing import Any, Dict, Optional, Tuple

from .base import Score

_LEADING_CHOICE = re.compile(r"^\(?([A-Za-z]|true|false|yes|no)\b\)?", re.IGNORECASE)
_CHOICE = r"\(?([A-J]|(?i:true|false|yes|no))\b\)?"  # a capital letter: "the answer is a compound" names none
_STATED = re.compile(r"(?i:answer is|answer\s*:|\\boxed\{)\s*:?\s*" + _CHOICE)  # "the answer is B", "Answer: C",
# \boxed{C}
_SEPARATOR = r"\s*(?:,|/|&|(?i:\bor|\band)\b)\s*"  # between two choices named at once
_ALTERNATIVE = re.compile(_SEPARATOR + _CHOICE)  # "... A or B", "A, C or D", "(A) or (B)", "A/B"
_LABELLED_LINE = re.compile(r"^[ \t*]*\(?([A-J])[.):][ \t]", re.MULTILINE)  # "B. 120 N" at the start of a line
_LISTED = re.compile(r"^\(?([A-J])\)?" + _SEPARATOR + r"\(?([A-J])\b", re.IGNORECASE)  # "A or B" in a tag
_TRUTH = {"TRUE": "TRUE", "YES": "TRUE", "FALSE": "FALSE", "NO": "FALSE"}


def _canonical(value: Any) -> str:
    """Upper-cased, outer punctuation and spaces removed, yes/no folded into true/false."""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    text = re.sub(r"\s+", " ", str(value)).strip().strip(".:;,!*()[]'\"` ").upper()
    return _TRUTH.get(text, text)


def _choice_in(text: str) -> Optional[str]:
    """The choice a short answer text names: the whole text, or its leading letter / truth word; None when it names
    two ("A or B")."""
    whole = _canonical(text)
    if len(whole) == 1 or whole in ("TRUE", "FALSE"):
        return whole
    if _LISTED.match(text.strip()):
        return None
    match = _LEADING_CHOICE.match(text.strip())
    return _canonical(match.group(1)) if match else None


def last_answer_tag(response: str) -> Optional[str]:
    """Text inside the last ``<answer>...</answer>`` (case-insensitive); None if there is none."""
    span = answer_tag_span(response)
    return response[span[0]:span[1]].strip() if span else None


def answer_tag_span(response: str) -> Optional[Tuple[int, int]]:
    """Character span of the text inside the last ``<answer>...</answer>``; None if there is none."""
    lowered = response.lower()
    end = lowered.rfind("</answer>")
    start = lowered.rfind("<answer>", 0, end) if end >= 0 else -1
    return (start + len("<answer>"), end) if start >= 0 else None


def _untagged(response: str) -> Tuple[Optional[str], Optional[Tuple[int, int]]]:
    """The choice a response without a tag names, and where: the whole response when it is only a choice, else every
    statement of an answer ("the answer is B", "Answer: C", ``\boxed{C}``) and a line that starts with an option
    label ("B. 120 N"). Lines starting with several different labels are the options restated, not an answer; a
    response naming more than one choice ("C. ...\nAnswer: D", two different statements) names none."""
    bare = _canonical(response)
    if len(bare) == 1 and bare.isalpha() or bare in ("TRUE", "FALSE"):
        return bare, (0, len(response))
    labelled = [(m.start(1), m.end(1), m.group(1)) for m in _LABELLED_LINE.finditer(response)]
    if len({choice for _, _, choice in labelled}) > 1:
        labelled = []
    stated = list(_STATED.finditer(response))
    if any(_ALTERNATIVE.match(response, m.end()) for m in stated):  # a hedge: "the answer is A or B"
        return None, None
    found = sorted([(m.start(1), m.end(1), _canonical(m.group(1))) for m in stated] + labelled)
    if len({choice for _, _, choice in found}) != 1:
        return None, None
    start, end, choice = found[-1]
    return choice, (start, end)


def extract_choice(response: str, strict: bool = True) -> str | None:
    """The choice named in the last answer tag (a letter, or TRUE/FALSE), upper-cased; None if absent or if it names
    more than one.

    Not ``strict``: without a tag, a response that is only a choice (``"B"``, ``"No."``), or that names exactly one
    choice by stating it ("the answer is B", "Answer: B", ``\boxed{B}``) or by starting a line with its label, is
    read as that choice.
    """
    if not isinstance(response, str):
        return None
    tag = last_answer_tag(response)
    if tag is not None:
        return _choice_in(tag)
    return None if strict else _untagged(response)[0]


def answer_span(response: str, strict: bool = True) -> Optional[Tuple[int, int]]:
    """Where in ``response`` the verifier read the answer (character offsets), for the analysis's answer-span
    score; None where it read none."""
    span = answer_tag_span(response)
    if span is not None or strict:
        return span
    return _untagged(response)[1]


def _ground_truth(ground_truth: Any) -> tuple[str, Dict[str, str]]:
    """(expected answer, {canonical option text: label}) from any accepted ground-truth shape."""
    if isinstance(ground_truth, dict):
        expected = next(
            (ground_truth[k] for k in ("answerKey", "answer", "label") if str(ground_truth.get(k, "")).strip()), ""
        )
        choices = ground_truth.get("choices") or {}
        labels, texts = choices.get("label") or [], choices.get("text") or []
        options = {_canonical(t): _canonical(lab) for lab, t in zip(labels, texts)}
        return _canonical(expected), options
    return _canonical(ground_truth), {}


def verify_sci(response: str, ground_truth: Any, strict: bool = True) -> Score:
    """Reward 1 when the chosen option equals ``ground_truth`` (a letter such as ``"B"``, or true/false)."""
    try:
        expected, options = _ground_truth(ground_truth)
    except Exception:  # noqa: BLE001 - an odd ground truth scores 0, it never raises
        return Score(0.0, "Invalid ground truth for a multiple-choice question.")
    if not expected:
        return Score(0.0, "Invalid ground truth: no answer given.")
    chosen = extract_choice(response, strict)
    tag = last_answer_tag(response) if isinstance(response, str) else None
    if options and tag is not None and _canonical(tag) in options:  # the option written out in full
        chosen = options[_canonical(tag)]
    if chosen is None:
        return Score(0.0, "No answer found: the final answer must be written as <answer>X</answer>.")
    expected = options.get(expected, expected)  # a ground truth given as option text
    chosen = options.get(chosen, chosen)  # "TRUE" answering options "A: True, B: False"
    if chosen == expected:
        return Score(1.0, None)
    return Score(0.0, f"The answer {chosen} is incorrect.")


def verify_sci_lenient(response: str, ground_truth: Any) -> Score:
    """:func:`verify_sci` that also reads untagged answers (a bare letter, "the answer is B", "B. ...")."""
    return verify_sci(response, ground_truth, strict=False)


verify_sci.executor = verify_sci_lenient.executor = "inline"
