"""Tool use: the Berkeley Function Calling Leaderboard (embedded, from the ``bfcl-eval`` wheel) and ToolAlpaca rows.

The prompt shows the function descriptions and the request; the model answers with the call(s). Ground truths
are the tool verifier's two shapes (see :mod:`mopd_lightning.rewards.tool`): BFCL's possible answers
``[{func_name: {arg: [acceptable values]}}]``, or ``{"calls": [{"name", "arguments"}]}`` for ToolAlpaca's
golden ``Action:`` / ``Action Input:`` answers, which must match exactly.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Dict, List, Mapping, Optional

from ..rewards.tool import parse_calls
from . import wheels
from .chat import user_turn
from .example import DataError, Example

BFCL_CATEGORIES = ("simple_python", "multiple", "parallel")
"""BFCL's single-turn categories with possible answers that the embedded data uses (about 800 entries)."""
CALL_INSTRUCTION = (
    "Answer with the function call(s) that fulfil the request and nothing else, in Python syntax, e.g. "
    "`func(arg=value)`; write several calls as a list, `[f(a=1), g(b=2)]`. JSON such as "
    '`{"name": "func", "arguments": {"arg": value}}` is accepted too.'
)
ACTION_INSTRUCTION = (
    "For each call, write one line `Action: <function name>` followed by one line `Action Input: <the arguments "
    "as a JSON object>`."
)


def _tool_prompt(docs: str, request: str, instruction: str) -> str:
    return f"You can call these functions:\n{docs}\n\nRequest: {request}\n\n{instruction}"


def _json_docs(functions: List[Any]) -> str:
    return "```json\n" + "\n".join(json.dumps(f, ensure_ascii=False) for f in functions) + "\n```"


# --------------------------------------------------------------------------------------------- BFCL


def _bfcl_turn(question: Any) -> List[Dict[str, str]]:
    """The messages of a BFCL question: its first turn (``[[{role, content}, ...]]``) or a plain string."""
    if isinstance(question, str) and question.strip():
        return [{"role": "user", "content": question}]
    if isinstance(question, list) and question and isinstance(question[0], list):
        question = question[0]  # single-turn categories hold exactly one turn
    if (isinstance(question, list) and question
            and all(isinstance(m, Mapping) and isinstance(m.get("content"), str) for m in question)
            and any(m.get("role") == "user" for m in question)):
        return [{"role": str(m.get("role")), "content": m["content"]} for m in question]
    raise DataError("field 'question' must be a string or BFCL's list of turns of {role, content} messages")


def bfcl_example(row: Mapping[str, Any], row_id: str, system_prompt: Optional[str] = None) -> Example:
    """A BFCL row: ``question``, ``function`` (descriptions) and ``ground_truth`` (the possible answer)."""
    turn = _bfcl_turn(row.get("question"))
    functions = row.get("function")
    if isinstance(functions, Mapping):
        functions = [functions]
    if not isinstance(functions, list) or not functions:
        raise DataError("field 'function' must be a non-empty list of function descriptions")
    truth = bfcl_ground_truth(row.get("ground_truth"), "ground_truth")
    request = "\n".join(m["content"] for m in turn if m["role"] != "system")
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    messages += [m for m in turn if m["role"] == "system"]
    messages.append({"role": "user", "content": _tool_prompt(_json_docs(functions), request, CALL_INSTRUCTION)})
    return Example(row_id, messages, truth, "tool", {"bfcl_id": row.get("id")})


def bfcl_ground_truth(value: Any, field: str) -> List[Dict[str, Dict[str, list]]]:
    """BFCL's possible answer: a non-empty list of ``{func_name: {arg: [acceptable values]}}``."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise DataError(f"field {field!r} is not valid JSON") from None
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, list):  # parquet structs fill the keys other rows use with nulls: drop them
        value = [{k: {a: v for a, v in args.items() if v is not None} if isinstance(args, Mapping) else args
                  for k, args in call.items() if args is not None} if isinstance(call, Mapping) else call
                 for call in value]
    valid = isinstance(value, list) and value and all(
        isinstance(call, Mapping) and len(call) == 1 and isinstance(next(iter(call.values())), Mapping)
        for call in value)
    if not valid:
        raise DataError(f"field {field!r} must be a list of {{function name: {{argument: [acceptable values]}}}}")
    return [dict(call) for call in value]


@functools.lru_cache(maxsize=1)
def _bfcl_rows() -> List[Dict[str, Any]]:
    rows = []
    for category in BFCL_CATEGORIES:
        name = f"BFCL_v4_{category}.json"
        questions = wheels.read_jsonl(wheels.BFCL, f"bfcl_eval/data/{name}")
        possible = wheels.read_jsonl(wheels.BFCL, f"bfcl_eval/data/possible_answer/{name}")
        answers = {a["id"]: a["ground_truth"] for a in possible}
        rows += [dict(q, ground_truth=answers[q["id"]]) for q in questions if q["id"] in answers]
    return rows


def embedded_bfcl(system_prompt: Optional[str] = None) -> List[Example]:
    """BFCL's simple, multiple and parallel entries; a request that recurs in a later category is kept once,
    so that no two splits can share a question."""
    examples, seen = [], set()
    for row in _bfcl_rows():
        request = tuple(m["content"] for m in _bfcl_turn(row["question"]))
        if request not in seen:
            seen.add(request)
            examples.append(bfcl_example(row, row["id"], system_prompt))
    return examples


# --------------------------------------------------------------------------------------------- ToolAlpaca

INSTRUCTION_FIELDS = ("instruction", "Instruction", "query", "input")
GOLDEN_FIELDS = ("Golden_Answers", "golden_answers", "golden_answer", "answer", "output")
DOC_FIELDS = ("Function_Description", "functions", "tools", "NLDocumentation", "documentation")


def _golden_calls(value: Any, field: str) -> List[Dict[str, Any]]:
    """ToolAlpaca's golden answer as ``[{"name", "arguments"}]``: text with ``Action:`` / ``Action Input:`` lines,
    or a list of ``{"Action", "Action_Input"}`` steps (``Action_Input`` a JSON object or its text)."""
    if isinstance(value, str):
        calls = parse_calls(value) if "Action" in value else []
        steps = [{"name": c.name, "arguments": c.arguments} for c in calls]
    elif isinstance(value, list):
        if len(value) == 1 and isinstance(value[0], list):
            value = value[0]  # one instance's golden answer, nested
        steps = []
        for step in value:
            if not isinstance(step, Mapping):
                raise DataError(f"field {field!r}: each step must be an object with 'Action' and 'Action_Input'")
            name = step.get("Action", step.get("action", step.get("name")))
            arguments = step.get("Action_Input", step.get("action_input", step.get("arguments", {})))
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments) if arguments.strip() else {}
                except ValueError:
                    arguments = None
            steps.append({"name": name, "arguments": arguments})
    else:
        steps = []
    if not steps:
        raise DataError(f"field {field!r} holds no golden call (expected 'Action:' / 'Action Input:' steps)")
    for n, step in enumerate(steps, start=1):
        if not isinstance(step["name"], str) or not step["name"].strip():
            raise DataError(f"field {field!r}: step {n} has no function name")
        if not isinstance(step["arguments"], Mapping):
            raise DataError(f"field {field!r}: the Action Input of step {n} is not a JSON object")
        step["name"], step["arguments"] = step["name"].strip(), dict(step["arguments"])
    return steps


def _alpaca_docs(row: Mapping[str, Any]) -> str:
    for field in DOC_FIELDS:
        docs = row.get(field)
        if isinstance(docs, Mapping) and docs:
            return "\n".join(f"- {name}: {text}" for name, text in docs.items())
        if isinstance(docs, list) and docs:
            return _json_docs(docs)
        if isinstance(docs, str) and docs.strip():
            return docs.strip()
    raise DataError(f"no function descriptions: fields {', '.join(repr(f) for f in DOC_FIELDS)} are all missing")


def toolalpaca_example(row: Mapping[str, Any], row_id: str, system_prompt: Optional[str] = None) -> Example:
    """A ToolAlpaca row: an instruction, the API's function descriptions and the golden calls."""
    request = next((row[f] for f in INSTRUCTION_FIELDS if isinstance(row.get(f), str) and row[f].strip()), None)
    if request is None:
        raise DataError(f"field 'instruction' (or {', '.join(repr(f) for f in INSTRUCTION_FIELDS[1:])}) is missing")
    golden_field = next((f for f in GOLDEN_FIELDS if row.get(f) is not None), None)
    if golden_field is None:
        raise DataError(f"field 'Golden_Answers' (or {', '.join(repr(f) for f in GOLDEN_FIELDS[1:])}) is missing")
    truth = {"calls": _golden_calls(row[golden_field], golden_field)}
    messages = user_turn(_tool_prompt(_alpaca_docs(row), request.strip(), ACTION_INSTRUCTION), system_prompt)
    return Example(row_id, messages, truth, "tool", {"api": row.get("Name") or row.get("api")})


def tool_ground_truth(value: Any, field: str) -> Any:
    """A tool ground truth of unknown shape (verl rows): BFCL possible answers, ``{"calls": ...}`` or ToolAlpaca
    golden steps, checked and normalised."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {"calls": _golden_calls(value, field)}  # Action: / Action Input: text
    if isinstance(value, Mapping) and isinstance(value.get("calls"), list):
        return {"calls": _golden_calls(value["calls"], field)}
    steps = value[0] if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list) else value
    if isinstance(steps, list) and steps and all(isinstance(s, Mapping) and ("Action" in s or "name" in s)
                                                  for s in steps):
        return {"calls": _golden_calls(steps, field)}
    return bfcl_ground_truth(value, field)


def tool_example(row: Mapping[str, Any], row_id: str, system_prompt: Optional[str] = None) -> Example:
    """A BFCL row when it has ``function``, else a ToolAlpaca row."""
    if "function" in row:
        return bfcl_example(row, row_id, system_prompt)
    return toolalpaca_example(row, row_id, system_prompt)
