"""Multiple-choice verifier: the answer is the letter inside the last ``<answer>...</answer>`` tag."""

from __future__ import annotations

import re
from typing import Any

from .base import Score, register_verifier

_ANSWER_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.IGNORECASE | re.DOTALL)
_LEADING_CHOICE = re.compile(r"^\(?([A-Za-z]|true|false|yes|no)\b\)?", re.IGNORECASE)


def extract_choice(response: str) -> str | None:
    """The choice named in the last answer tag (a letter, or true/false), upper-cased; None if absent."""
    tags = _ANSWER_TAG.findall(response)
    if not tags:
        return None
    match = _LEADING_CHOICE.match(tags[-1].strip())
    return match.group(1).upper() if match else None


def verify_mcq(response: str, ground_truth: Any) -> Score:
    """Reward 1 when the chosen option equals ``ground_truth`` (a letter such as ``"B"``, or true/false)."""
    expected = str(ground_truth).strip().upper()
    chosen = extract_choice(response if isinstance(response, str) else "")
    if chosen is None:
        return Score(0.0, "No answer found: the final answer must be written as <answer>X</answer>.")
    if chosen == expected:
        return Score(1.0, None)
    return Score(0.0, f"The answer {chosen} is incorrect.")


@register_verifier("mcq")
def _mcq_factory():
    return verify_mcq
