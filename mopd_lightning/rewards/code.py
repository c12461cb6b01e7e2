"""Code verifier: run the response's program against the ground truth's tests, inside the sandbox.

Three test shapes (the ground truth is a dict, or its JSON text):

- ``{"kind": "humaneval", "prompt", "test", "entry_point"}``: program = prompt + completion. When the response's
  code defines ``entry_point`` itself, it follows the prompt (whose imports and helper functions it may use) and
  replaces the prompt's stub; otherwise it continues the prompt. The test never runs in the program's process: a
  judged run (``harness/``) has a judge process run ``check`` on a stand-in that forwards each call to the program
  and gets back plain built-in values only, so neither a forged "passed" nor an object equal to everything counts.
- ``{"kind": "stdio", "tests": [{"input", "output"}, ...]}``: one run per test, the input on stdin; passes when
  stdout equals the expected output up to surrounding and repeated whitespace.
- ``{"kind": "functional", "fn_name", "tests": [{"input", "output"}, ...]}``: ``input`` holds one JSON value per
  line, one line per argument (never split on spaces); ``output`` is JSON. The function is ``Solution().fn_name``
  (LeetCode / LiveCodeBench) or a top-level ``fn_name``; all tests run in one sandboxed process, and the verifier
  compares the returned values (decoded from JSON, so plain values) outside it; expected outputs never go in.

``"inputs": [...], "outputs": [...]`` (the verl / APPS layout) is accepted in place of ``tests``, and ``kind`` is
inferred when absent. The reward is the fraction of tests passed, or 1/0 with ``all_or_nothing``; the feedback
names the first failing test.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import os
from typing import Any, List, Optional, Tuple

from ..execution import Limits, RunResult, isolation, run_python
from .base import Score
from .markdown import fenced_blocks

_PYTHON_LANGS = {"", "python", "python3", "py"}
_HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness")
# What LeetCode-style solutions assume is already imported (``List``, ``deque``, ``inf``, ...).
_FUNCTIONAL_PRELUDE = (
    "from typing import *\nfrom collections import *\nfrom math import *\nfrom functools import *\n"
    "from itertools import *\nfrom heapq import *\nfrom bisect import *\n"
    "import math, heapq, bisect, itertools, functools, collections, re, string\n"
)
_FEEDBACK_FIELD = 120


def _program(response: str) -> Tuple[str, int]:
    """The last fenced Python (or unlabelled) code block, an unclosed final one included, else the whole text; and
    where it starts."""
    blocks = [b for b in fenced_blocks(response) if b.language in _PYTHON_LANGS]
    return (blocks[-1].code, blocks[-1].start) if blocks else (response, 0)


def extract_code(response: str) -> str:
    """The last fenced Python (or unlabelled) code block, an unclosed final one included; else the whole text."""
    return _program(response)[0]


def answer_span(response: str, strict: bool = True) -> Tuple[int, int]:
    """Where the program stands in ``response`` (its last code block, or all of it), for the analysis's
    answer-span score."""
    code, start = _program(response)
    return start, min(start + len(code), len(response))


def _short(value: Any, limit: int = _FEEDBACK_FIELD) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(text.split()) if len(text) > limit else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_summary(result: RunResult, timeout_s: float) -> str:
    if result.timed_out:
        return f"timed out after {timeout_s:g}s"
    if result.output_exceeded:
        return "output limit exceeded"
    lines = [line.strip() for line in result.stderr.strip().splitlines() if line.strip()]
    if not lines:
        return f"exit status {result.returncode}"
    failed_assert = next((line for line in reversed(lines) if line.startswith("assert ")), None)
    if lines[-1] == "AssertionError" and failed_assert:  # name the failing check, e.g. a HumanEval test case
        return f"AssertionError: {failed_assert}"
    return lines[-1]


def _failure(i: int, test_input: Any, expected: Any, got: str) -> str:
    return f"Test {i + 1} failed: input {_short(str(test_input))!r}, expected {_short(str(expected))!r}, {got}."


def _defines(code: str, name: str) -> bool:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name for node in tree.body)


@functools.lru_cache(maxsize=None)
def _harness(name: str) -> str:
    with open(os.path.join(_HARNESS, name + ".py"), encoding="utf-8") as f:
        return f.read()


def _with_plain_values(name: str, call: str) -> str:
    """A harness script preceded by the plain-value codec it uses, ending with ``call``."""
    return _harness("plain") + "\n\n" + _harness(name) + "\n\n" + call + "\n"


def _normalise_lines(text: str) -> List[str]:
    return [" ".join(line.split()) for line in text.strip().splitlines()]


def _same_value(got: Any, expected: Any) -> bool:
    """Equality of JSON values, with floats equal up to 1e-9 relative error (ints and floats compare by value)."""
    if isinstance(got, bool) or isinstance(expected, bool):
        return got is expected if isinstance(got, bool) and isinstance(expected, bool) else got == expected
    if isinstance(got, (int, float)) and isinstance(expected, (int, float)):
        return got == expected or math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(got, list) and isinstance(expected, list):
        return len(got) == len(expected) and all(_same_value(g, e) for g, e in zip(got, expected))
    if isinstance(got, dict) and isinstance(expected, dict):
        return got.keys() == expected.keys() and all(_same_value(got[k], expected[k]) for k in got)
    return got == expected


def _load_json_or_text(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text.strip()


def _arguments(test_input: Any) -> list:
    """One JSON value per non-empty line; a list already parsed is taken as the argument list itself."""
    if isinstance(test_input, list):
        return test_input
    if not isinstance(test_input, str):
        return [test_input]
    return [json.loads(line) for line in test_input.splitlines() if line.strip()]


def _tests(ground_truth: dict) -> List[Tuple[Any, Any]]:
    if "tests" in ground_truth:
        return [(t["input"], t["output"]) for t in ground_truth["tests"]]
    inputs, outputs = ground_truth["inputs"], ground_truth["outputs"]
    if len(inputs) != len(outputs):
        raise ValueError("inputs and outputs differ in length")
    return list(zip(inputs, outputs))


def _kind(ground_truth: dict) -> str:
    if "kind" in ground_truth:
        return str(ground_truth["kind"])
    if "entry_point" in ground_truth and "test" in ground_truth:
        return "humaneval"
    if ground_truth.get("fn_name"):
        return "functional"
    return "stdio"


class CodeVerifier:
    """Scores a response by running its code on the ground truth's tests in the sandbox.

    Args:
        all_or_nothing: reward 1 only when every test passes (and stop at the first failure); otherwise the
            reward is the fraction of tests passed.
        timeout_s: wall-clock limit per test (per program for HumanEval), in seconds.
        memory_mb: memory limit of the program (per process, and per run where a memory cgroup is available), MiB.
        sandbox: the least isolation the code may run under: ``auto`` (the best the machine allows, with a loud
            warning below ``full``), ``full``, ``namespaces`` or ``process`` (see :mod:`mopd_lightning.execution`).
            Checked when the verifier is built: a machine that allows less raises ``SandboxUnavailable``.
    """

    executor = "thread"  # the work happens in sandbox subprocesses, so threads parallelise it

    def __init__(self, all_or_nothing: bool = False, timeout_s: float = 5.0, memory_mb: int = 1024,
                 sandbox: str = "auto"):
        self.all_or_nothing = all_or_nothing
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.sandbox = sandbox
        self.isolation = isolation(sandbox)

    def __repr__(self) -> str:
        return (
            f"CodeVerifier(all_or_nothing={self.all_or_nothing}, timeout_s={self.timeout_s}, "
            f"memory_mb={self.memory_mb}, sandbox={self.sandbox!r})"
        )

    def _run(self, script: str, **options) -> RunResult:
        return run_python(script, required=self.sandbox, **options)

    def _limits(self, n_tests: int = 1) -> Limits:
        timeout = self.timeout_s * n_tests + 1.0  # + interpreter start-up
        return Limits(timeout_s=timeout, memory_mb=self.memory_mb, cpu_s=math.ceil(timeout) + 1)

    def __call__(self, response: str, ground_truth: Any) -> Score:
        try:
            if isinstance(ground_truth, (str, bytes)):
                ground_truth = json.loads(ground_truth)
            if not isinstance(ground_truth, dict):
                return Score(0.0, "Invalid ground truth: expected a dict describing the tests.")
            response = response if isinstance(response, str) else ""
            kind = _kind(ground_truth)
            if kind == "humaneval":
                return self._humaneval(response, ground_truth)
            if kind == "stdio":
                return self._stdio(extract_code(response), _tests(ground_truth))
            if kind == "functional":
                fn_name = str(ground_truth["fn_name"])
                return self._functional(extract_code(response), fn_name, _tests(ground_truth))
            return Score(0.0, f"Invalid ground truth: unknown test kind {kind!r}.")
        except Exception as e:  # noqa: BLE001 - malformed ground truths score 0, they never crash training
            return Score(0.0, f"Invalid ground truth: {_short(f'{type(e).__name__}: {e}')}")

    def _score(self, passed: int, total: int, first_failure: Optional[str]) -> Score:
        if total == 0:
            return Score(0.0, "Invalid ground truth: no tests.")
        reward = float(passed == total) if self.all_or_nothing else passed / total
        return Score(reward, first_failure)

    def _humaneval(self, response: str, gt: dict) -> Score:
        """A judged run: the program answers calls, the judge runs ``check`` on plain values (see ``harness/``)."""
        prompt, entry_point = str(gt["prompt"]), str(gt["entry_point"])
        code = extract_code(response)
        if _defines(code, entry_point):
            solution = prompt + "\n\n" + code  # a full function: its definition replaces the prompt's stub
        else:
            solution = prompt + code
        problem = {"prompt": prompt, "test": str(gt["test"]), "entry_point": entry_point}
        result = self._run(_with_plain_values("callee", f"serve({entry_point!r})"), files={"solution.py": solution},
                           judge=_with_plain_values("judge", f"judge({json.dumps(problem)})"),
                           limits=self._limits(), preload=("json", "typing"))
        if result.ok and result.stdout.strip() == "PASSED":
            return Score(1.0, None)
        return Score(0.0, f"Tests failed: {_short(_error_summary(result, self.timeout_s))}")

    def _stdio(self, code: str, tests: List[Tuple[Any, Any]]) -> Score:
        passed, first_failure = 0, None
        for i, (test_input, expected) in enumerate(tests):
            result = self._run(code, stdin=str(test_input), limits=self._limits())
            if result.ok and _normalise_lines(result.stdout) == _normalise_lines(str(expected)):
                passed += 1
                continue
            if first_failure is None:
                error = _short(_error_summary(result, self.timeout_s))
                got = f"got {_short(result.stdout)!r}" if result.ok else f"error: {error}"
                first_failure = _failure(i, test_input, expected, got)
            if self.all_or_nothing:
                break
        return self._score(passed, len(tests), first_failure)

    def _functional(self, code: str, fn_name: str, tests: List[Tuple[Any, Any]]) -> Score:
        if not tests:
            return self._score(0, 0, None)
        args = [_arguments(test_input) for test_input, _ in tests]
        files = {
            "solution.py": _FUNCTIONAL_PRELUDE + code,
            "tests.json": json.dumps({"fn_name": fn_name, "args": args, "timeout_s": self.timeout_s}),
        }
        result = self._run(_harness("functional"), files=files, limits=self._limits(len(tests)))
        records = {}
        for line in result.stdout.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                if "setup_error" in record:
                    feedback = f"The program failed to load: {_short(record['setup_error'])}"
                    return self._score(0, len(tests), feedback)
                records.setdefault(record.get("i"), record)
        passed, first_failure = 0, None
        for i, (test_input, expected) in enumerate(tests):
            record = records.get(i) or {}
            if "result" in record and _same_value(record["result"], _load_json_or_text(expected)):
                passed += 1
                continue
            if first_failure is None:
                if "error" in record:
                    got = f"error: {_short(record['error'])}"
                elif "result" in record:
                    got = f"got {_short(json.dumps(record['result']))}"
                else:  # the process died or hung before reaching this test
                    got = f"error: {_short(_error_summary(result, self.timeout_s))}"
                first_failure = _failure(i, test_input, expected, got)
        return self._score(passed, len(tests), first_failure)
