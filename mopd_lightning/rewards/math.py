"""Math verifier: extract the final answer, then decide equivalence with the ``math-verify`` library.

The answer is the last ``\\boxed{...}`` (balanced braces), as the prompts ask. Strict (the default) stops there;
lenient also takes the text after the last "answer is", else the last number in the response. Equivalence (``3/4`` = ``\\frac{3}{4}`` = ``0.75``, ``x=2`` = ``2``) is math-verify's
symbolic and numeric comparison, under its time limit.

math-verify enforces that limit with ``signal.alarm``, which works only in a process's main thread. Called from
any other thread, :func:`verify_math` therefore runs the check in the shared worker-process pool
(:mod:`.parallel`), where each worker's main thread may use signals, and ``verify_batch`` sends math there too.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Optional, Tuple

from .base import Score

TIMEOUT_S = 5
"""math-verify's limit (whole seconds, it uses ``signal.alarm``) for parsing one answer and for one comparison."""
_MAX_ANSWER_CHARS = 1000
_BOX = re.compile(r"\\(?:boxed|fbox)\b")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*:?[ \t]*", re.IGNORECASE)
_TOKEN = re.compile(r"[^\s$]+")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?")


def _last_boxed_span(text: str) -> Optional[Tuple[int, int]]:
    """Where the content of the last ``\\boxed{...}`` (nested braces balanced) or ``\\boxed x`` stands."""
    boxes = list(_BOX.finditer(text))
    if not boxes:
        return None
    closing, stack = {}, []  # one linear pass pairs every brace after the first box
    for i in range(boxes[0].end(), len(text)):
        if text[i] == "{":
            stack.append(i)
        elif text[i] == "}" and stack:
            closing[stack.pop()] = i
    for box in reversed(boxes):
        i = box.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            if i in closing:
                return i + 1, closing[i]
            continue  # unbalanced: the generation was cut off inside this box
        token = _TOKEN.match(text, i) if i > box.end() else None
        if token:
            return token.span()
    return None


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (nested braces balanced) or ``\\boxed x``; None if absent."""
    span = _last_boxed_span(text)
    return text[span[0]:span[1]] if span else None


def _located_answer(response: str, strict: bool) -> Optional[Tuple[str, int]]:
    """The final answer and where it starts: the last box's content; lenient, else the rest of the line after the
    last "answer is", else the last number."""
    found = None
    span = _last_boxed_span(response)
    if span is not None:
        found = response[span[0]:span[1]], span[0]
    if found is None and not strict:
        matches = list(_ANSWER_IS.finditer(response))
        if matches:
            line = response[matches[-1].end():].split("\n", 1)[0]
            line = line.strip().rstrip(".").strip().strip("*").strip()
            found = (line, matches[-1].end()) if line else None
    if found is None and not strict:
        numbers = list(_NUMBER.finditer(response))
        if numbers:
            found = numbers[-1].group(0), numbers[-1].start()
    if found is None:
        return None
    answer = found[0].strip().strip("$").strip()[:_MAX_ANSWER_CHARS]
    return (answer, found[1] + response[found[1]:].find(answer)) if answer else None


def extract_answer(response: str, strict: bool = True) -> Optional[str]:
    """The final answer written in ``response``, as text; None when there is none (strict: no ``\\boxed``)."""
    located = _located_answer(response, strict)
    return located[0] if located else None


def answer_span(response: str, strict: bool = True) -> Optional[Tuple[int, int]]:
    """Where the verifier read the final answer in ``response`` (character offsets: inside the last box, not a later
    mention of the same text), for the analysis's answer-span score and the answer-span loss; None where there is
    none."""
    located = _located_answer(response, strict)
    return (located[1], located[1] + len(located[0])) if located else None


def _parse(text: str):
    from math_verify import parse

    if "$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text:
        return parse(text, parsing_timeout=TIMEOUT_S)
    return parse(f"${text}$", parsing_timeout=TIMEOUT_S) or parse(text, parsing_timeout=TIMEOUT_S)


def _compact(text: str) -> str:
    return re.sub(r"\s+|\$", "", text)


def _verify_here(response: str, ground_truth: Any, strict: bool) -> Score:
    from math_verify import verify

    answer = extract_answer(response, strict)
    if answer is None:
        return Score(0.0, "No final answer found: write the final answer as \\boxed{...}.")
    gold_text = str(ground_truth).strip()
    if not gold_text:
        return Score(0.0, "Invalid ground truth: empty.")
    if _compact(answer) == _compact(gold_text):
        return Score(1.0, None)
    gold = _parse(gold_text)
    if not gold:
        return Score(0.0, "Invalid ground truth: math-verify could not parse it.")
    predicted = _parse(answer)
    if predicted and verify(gold, predicted, timeout_seconds=TIMEOUT_S):
        return Score(1.0, None)
    shown = answer if len(answer) <= 80 else answer[:77] + "..."
    return Score(0.0, f"The answer {shown} is incorrect.")


def verify_math(response: str, ground_truth: Any) -> Score:
    """Reward 1 when the response's boxed final answer is mathematically equivalent to ``ground_truth``."""
    return _verify(verify_math, response, ground_truth, strict=True)


def verify_math_lenient(response: str, ground_truth: Any) -> Score:
    """:func:`verify_math` that also reads an unboxed answer ("the answer is 4", else the last number)."""
    return _verify(verify_math_lenient, response, ground_truth, strict=False)


def _verify(entry, response: str, ground_truth: Any, strict: bool) -> Score:
    if not isinstance(response, str):
        return Score(0.0, "No final answer found: the response is not text.")
    if threading.current_thread() is not threading.main_thread():
        from .parallel import call_in_process

        return call_in_process(entry, response, ground_truth, timeout_s=6 * TIMEOUT_S)
    try:
        return _verify_here(response, ground_truth, strict)
    except BaseException as e:  # noqa: BLE001 - includes math-verify's TimeoutException (a BaseException)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return Score(0.0, f"Could not verify the answer: {type(e).__name__}.")


for _entry in (verify_math, verify_math_lenient):
    _entry.executor = "process"  # verify_batch runs it in worker processes (signals need a main thread)
    _entry.hard_timeout_s = 6 * TIMEOUT_S
