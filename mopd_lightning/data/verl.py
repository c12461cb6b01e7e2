"""Rows in the verl layout, as the reference implementation's users already have them in parquet files.

A row holds ``prompt`` (chat messages), ``reward_model.ground_truth``, ``data_source`` and usually ``ability``
(and ``extra_info``). The verifier is chosen from ``ability`` when it names one, else from ``data_source``
(``openai/gsm8k`` and ``DigitalLearningGmbH/MATH-lighteval`` are math, ``livecodebench`` code,
``sciknoweval`` multiple choice, ``tooluse`` tool use, ...). Every domain reads such rows, so a parquet file
may mix tasks: each example carries its own verifier.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Mapping, Optional

from ..rewards.named import read_ground_truth
from .code import code_truth
from .example import DataError, Example
from .tool import tool_ground_truth

ABILITIES = {
    "math": "math", "code": "code", "coding": "code",
    "sci": "sci", "mcq": "sci", "science": "sci", "multiple_choice": "sci",
    "tool": "tool", "tooluse": "tool", "tool_use": "tool", "function_calling": "tool",
    "named": "named",
}
"""``ability`` values that name a verifier (lower-cased)."""
DATA_SOURCES = (  # (verifier, words a lower-cased data_source contains); the first match wins
    ("tool", ("tool", "bfcl", "function_call", "xlam")),
    ("code", ("code", "apps", "taco", "humaneval", "mbpp", "leetcode", "primeintellect", "kodcode")),
    ("sci", ("sciknoweval", "gpqa", "mmlu", "mcq", "ai2_arc", "supergpqa")),
    ("math", ("math", "gsm8k", "aime", "amc", "deepscaler", "numina", "dapo", "olympiad", "minerva")),
)


def is_verl_row(row: Mapping[str, Any]) -> bool:
    return "reward_model" in row


def verifier_for(row: Mapping[str, Any]) -> str:
    """The verifier a verl row needs, from ``ability`` or else ``data_source``."""
    ability = str(row.get("ability") or "").strip().lower()
    if ability in ABILITIES:
        return ABILITIES[ability]
    source = str(row.get("data_source") or "").strip().lower()
    for verifier, words in DATA_SOURCES:
        if any(word in source for word in words):
            return verifier
    raise DataError(f"field 'data_source' is {row.get('data_source')!r} and field 'ability' is {row.get('ability')!r}; "
                    f"neither names a verifier (abilities: {sorted(set(ABILITIES))})")


def _math_truth(value: Any, field: str) -> str:
    if isinstance(value, list) and len(value) >= 1:
        value = value[0]  # a list of equivalent answers: the first is the reference
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"field {field!r} must be a non-empty answer text for math")
    return value.strip()


def _parsed(value: Any, field: str) -> Any:
    """A ground truth stored as a JSON object in a string (as parquet files often hold it), parsed."""
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            return json.loads(value)
        except ValueError:
            raise DataError(f"field {field!r} is not valid JSON") from None
    return value


def _sci_truth(value: Any, field: str) -> Any:
    value = _parsed(value, field)
    if isinstance(value, bool) or isinstance(value, Mapping) or (isinstance(value, str) and value.strip()):
        return value
    raise DataError(f"field {field!r} must be an answer letter, a truth value or an object with 'answerKey'")


def _named_truth(value: Any, field: str) -> Any:
    value = _parsed(value, field)
    try:
        read_ground_truth(value)
    except ValueError as error:
        raise DataError(f"field {field!r}: {error}") from None
    return value


GROUND_TRUTHS: Dict[str, Callable[[Any, str], Any]] = {
    "math": _math_truth, "code": code_truth, "sci": _sci_truth, "tool": tool_ground_truth, "named": _named_truth,
}


def _prompt_messages(prompt: Any) -> List[Dict[str, str]]:
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise DataError("field 'prompt' must be a non-empty list of {role, content} chat messages")
    messages = []
    for message in prompt:
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str) \
                or message.get("role") not in ("system", "user", "assistant"):
            raise DataError("field 'prompt' must be a non-empty list of {role, content} chat messages")
        messages.append({"role": message["role"], "content": message["content"]})
    if messages[-1]["role"] != "user":
        raise DataError("field 'prompt' must end with a user message")
    return messages


def verl_example(row: Mapping[str, Any], row_id: str, system_prompt: Optional[str] = None) -> Example:
    """One verl-layout row as an Example with the verifier its ``ability`` / ``data_source`` names.

    ``system_prompt`` is put first only when the row's prompt has no system message of its own.
    """
    messages = _prompt_messages(row.get("prompt"))
    reward_model = row.get("reward_model")
    if not isinstance(reward_model, Mapping) or reward_model.get("ground_truth") is None:
        raise DataError("field 'reward_model.ground_truth' is missing")
    verifier = verifier_for(row)
    truth = GROUND_TRUTHS[verifier](reward_model["ground_truth"], "reward_model.ground_truth")
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    meta = {"data_source": row.get("data_source"), "ability": row.get("ability")}
    return Example(row_id, messages, truth, verifier, meta)


def accepting_verl(converter: Callable[..., Example]) -> Callable[..., Example]:
    """``converter`` for a domain's own rows, with verl-layout rows (a ``reward_model`` key) read by
    :func:`verl_example` instead."""

    def from_row(row: Mapping[str, Any], row_id: str, system_prompt: Optional[str] = None) -> Example:
        if is_verl_row(row):
            return verl_example(row, row_id, system_prompt)
        return converter(row, row_id, system_prompt)

    from_row.__doc__ = converter.__doc__
    return from_row
