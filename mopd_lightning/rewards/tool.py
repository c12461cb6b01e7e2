"""Tool-use verifier: parse the function calls a response makes and match them against the expected calls.

Calls are read from (first that applies):

- ToolAlpaca's ``Action: name`` / ``Action Input: {json}`` lines (several allowed);
- ``<tool_call>...</tool_call>`` tags, else fenced code blocks (the last one that holds calls), else the whole
  text, each parsed as JSON (``{"name", "arguments"}``, OpenAI's ``{"function": {...}}``, BFCL's
  ``{"func": {args}}``, lists of these) or as Python call syntax (``f(a=1)``, ``[f(a=1), g(b=2)]``) with
  ``ast``; embedded calls are found by scanning with ``json.JSONDecoder.raw_decode`` and balanced brackets.

Two ground-truth shapes:

- BFCL's possible answers: ``[{func_name: {arg: [acceptable values]}}, ...]``. ``""`` among the acceptable values
  marks an optional argument. A value matches as in BFCL's AST checker: strings ignoring case, spaces and
  ``,./-_*^``; ints equal to floats of the same value (but booleans are not numbers); lists element-wise; dicts
  key-wise with acceptable values per key. No unexpected argument, no missing required one.
- ToolAlpaca-style ``{"calls": [{"name", "arguments"}, ...]}``: the parsed arguments must equal the expected ones.

Calls match as a set, in any order (parallel calls). Function names also match with ``.`` written as ``_``
(what OpenAI-style APIs force on BFCL's dotted names). The reward is 1/0 by default; with
``partial_credit=True`` it is (matched calls) / max(expected, made).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .base import Score
from .markdown import fenced_blocks

_MAX_SCAN_CHARS = 50_000
# Bounds on the work one response may cause (adversarial text such as 50,000 nested brackets):
_SCAN_BUDGET = 400_000  # characters the bracket matcher may visit
_MAX_FAILED_JSON = 1_000  # JSON decoding attempts that fail
_TOOL_CALL_TAG = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_ACTION = re.compile(r"^[ \t*]*Action[ \t*]*:[ \t*]*(.*?)[ \t*]*$", re.MULTILINE)
_ACTION_INPUT = re.compile(r"Action[ \t*]*Input[ \t*]*:[ \t*]*", re.IGNORECASE)
_CALL_START = re.compile(r"[A-Za-z_][\w.]*\(")
_ARG_KEYS = ("arguments", "parameters", "args", "input", "kwargs")
_DECODER = json.JSONDecoder()


@dataclass
class Call:
    """A function call read from a response. ``arguments`` is None when they could not be parsed."""

    name: str
    arguments: Optional[Dict[str, Any]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- parsing


def _calls_from_json(value: Any) -> Optional[List[Call]]:
    if isinstance(value, list):
        calls = [c for item in value for c in (_calls_from_json(item) or [])]
        return calls or None
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("tool_calls"), list):
        return _calls_from_json(value["tool_calls"])
    if isinstance(value.get("function"), dict) and "name" in value["function"]:
        return _calls_from_json(value["function"])
    if isinstance(value.get("name"), str):
        arguments = next((value[k] for k in _ARG_KEYS if k in value), {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                arguments = None
        return [Call(value["name"], arguments if isinstance(arguments, dict) else None)]
    if len(value) == 1:
        (name, arguments), = value.items()
        if isinstance(arguments, dict):
            return [Call(str(name), arguments)]
    return None


def _dotted_name(node: ast.AST) -> Optional[str]:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted_name(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _python_value(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return ast.unparse(node)  # a variable or an expression: compared as its source text, like BFCL


def _calls_from_ast(node: ast.AST) -> Optional[List[Call]]:
    if isinstance(node, ast.Call):
        name = _dotted_name(node.func)
        if name is None or any(k.arg is None for k in node.keywords):
            return None
        arguments = {f"<positional {i}>": _python_value(a) for i, a in enumerate(node.args)}
        arguments.update({k.arg: _python_value(k.value) for k in node.keywords})
        return [Call(name, arguments)]
    if isinstance(node, (ast.List, ast.Tuple)) and node.elts:
        parts = [_calls_from_ast(e) for e in node.elts]
        return None if any(p is None for p in parts) else [c for p in parts for c in p]
    if isinstance(node, ast.Expression):
        return _calls_from_ast(node.body)
    if isinstance(node, ast.Module) and node.body:
        parts = [_calls_from_ast(s.value) if isinstance(s, (ast.Expr, ast.Assign)) else None for s in node.body]
        return None if any(p is None for p in parts) else [c for p in parts for c in p]
    return None


def _parse_python(text: str) -> Optional[List[Call]]:
    try:
        return _calls_from_ast(ast.parse(text.strip()))
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None


def _balanced_end(text: str, start: int, budget: List[int]) -> Optional[int]:
    """Index just past the bracket closing the one at ``start``, skipping string literals; None if unclosed.

    Every visited character is taken from ``budget[0]``; once it is spent the answer is None.
    """
    closing = {"(": ")", "[": "]", "{": "}"}
    stack, i, quote = [], start, None
    while i < len(text):
        budget[0] -= 1
        if budget[0] < 0:
            return None
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif text.startswith(quote, i):
                i += len(quote) - 1
                quote = None
        elif ch in "'\"":
            quote = text[i : i + 3] if text[i : i + 3] in ("'''", '"""') else ch
            i += len(quote) - 1
        elif ch in closing:
            stack.append(closing[ch])
        elif ch in ")]}":
            if not stack or stack.pop() != ch:
                return None
            if not stack:
                return i + 1
        i += 1
    return None


Span = Optional[Tuple[int, int]]


def _joined(first: Span, second: Span) -> Span:
    """The smallest span covering both (either may be None)."""
    if first is None or second is None:
        return first or second
    return min(first[0], second[0]), max(first[1], second[1])


def _scan(text: str) -> Tuple[List[Call], Span]:
    """Calls embedded in prose, left to right, and the span they cover; a JSON value or a call, once read, is
    skipped as a whole."""
    calls: List[Call] = []
    span: Span = None
    budget = [_SCAN_BUDGET]
    i, failed_json = 0, 0
    while i < len(text):
        ch = text[i]
        if ch in "{[" and failed_json < _MAX_FAILED_JSON:
            try:
                value, end = _DECODER.raw_decode(text, i)
            except (ValueError, RecursionError):
                failed_json += 1
            else:
                found = _calls_from_json(value) or []
                calls += found
                span = _joined(span, (i, end)) if found else span
                i = end
                continue
        starts_call = ch == "[" or (
            (i == 0 or not (text[i - 1].isalnum() or text[i - 1] in "_.")) and _CALL_START.match(text, i)
        )
        if starts_call and budget[0] > 0:
            end = _balanced_end(text, i if ch == "[" else text.index("(", i), budget)
            found = _parse_python(text[i:end]) if end else None
            if found:
                calls += found
                span = _joined(span, (i, end))
                i = end
                continue
        i += 1
    return calls, span


def _shifted(span: Span, by: int) -> Span:
    return (span[0] + by, span[1] + by) if span else None


def _parse_segment(text: str) -> Tuple[List[Call], Span]:
    stripped = text.strip()
    lead = len(text) - len(text.lstrip())
    try:
        whole = _calls_from_json(json.loads(stripped))
    except (ValueError, RecursionError):
        whole = None
    whole = whole or _parse_python(stripped)
    if whole:
        return whole, (lead, lead + len(stripped))
    calls, span = _scan(stripped)
    return calls, _shifted(span, lead)


def _parse_actions(text: str) -> Tuple[List[Call], Span]:
    """ToolAlpaca's ``Action:`` / ``Action Input:`` pairs, and the span from the first action to the last input."""
    calls, span = [], None
    for match in _ACTION.finditer(text):
        name = match.group(1).strip("`'\" ")
        rest = text[match.end():]
        following = _ACTION_INPUT.search(rest)
        next_action = _ACTION.search(rest)
        if following is None or (next_action and next_action.start() < following.start()):
            calls.append(Call(name, {}))
            span = _joined(span, match.span())
            continue
        raw = rest[following.end():].lstrip()
        raw = re.sub(r"^```\w*\s*", "", raw)
        start = len(text) - len(raw)  # where the input's JSON starts
        try:
            arguments, end = _DECODER.raw_decode(raw)
        except (ValueError, RecursionError):
            arguments, end = None, len(raw.split("\n", 1)[0])
        calls.append(Call(name, arguments if isinstance(arguments, dict) else None))
        span = _joined(span, (match.start(), start + end))
    return calls, span


def read_calls(response: str) -> Tuple[List[Call], Span]:
    """Every function call the response makes, in order (see the module docstring for the formats), and where
    they were read: the span from the first to the last (the tool domain's answer span)."""
    if not isinstance(response, str):
        return [], None
    text = response[:_MAX_SCAN_CHARS]
    if _ACTION_INPUT.search(text):
        calls, span = _parse_actions(text)
        if calls:
            return calls, span
    tagged = list(_TOOL_CALL_TAG.finditer(text))
    if tagged:
        calls, span = [], None
        for tag in tagged:
            found, where = _parse_segment(tag.group(1))
            calls += found
            span = _joined(span, _shifted(where, tag.start(1)))
        return calls, span
    for block in reversed(fenced_blocks(text)):
        calls, span = _parse_segment(block.code)
        if calls:
            return calls, _shifted(span, block.start)
    return _parse_segment(text)


def parse_calls(response: str) -> List[Call]:
    """Every function call the response makes, in order (see the module docstring for the formats)."""
    return read_calls(response)[0]


def answer_span(response: str, strict: bool = True) -> Span:
    """Where the verifier read the calls in ``response`` (character offsets), for the answer-span score and loss;
    None where it read none."""
    calls, span = read_calls(response)
    return span if calls else None


# --------------------------------------------------------------------------------------------- matching


def standardize_string(text: str) -> str:
    """BFCL's string normalisation: drop spaces and ``,./-_*^``, lower-case, single quotes as double quotes."""
    return re.sub(r"[ ,./\-_*^]", "", text).lower().replace("'", '"')


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def value_matches(value: Any, acceptable: Any) -> bool:
    """Whether ``value`` (from the response) equals one acceptable value of BFCL's possible answer."""
    if isinstance(acceptable, bool) or isinstance(value, bool):
        return isinstance(acceptable, bool) and isinstance(value, bool) and value == acceptable
    if _is_number(acceptable):
        return _is_number(value) and value == acceptable
    if isinstance(acceptable, str):
        return isinstance(value, str) and standardize_string(value) == standardize_string(acceptable)
    if isinstance(acceptable, (list, tuple)):
        return (
            isinstance(value, (list, tuple))
            and len(value) == len(acceptable)
            and all(value_matches(v, a) for v, a in zip(value, acceptable))
        )
    if isinstance(acceptable, dict):
        return isinstance(value, dict) and (_dict_matches(value, acceptable) or _literal_dict(value, acceptable))
    return value == acceptable


def _dict_matches(value: dict, acceptable: dict) -> bool:
    """BFCL's dict answers: every key maps to a list of acceptable values, ``""`` marking an optional key."""
    if not all(isinstance(v, list) for v in acceptable.values()):
        return False
    if any(key not in acceptable for key in value):
        return False
    for key, options in acceptable.items():
        if key not in value:
            if "" not in options:
                return False
        elif not any(value_matches(value[key], option) for option in options):
            return False
    return True


def _literal_dict(value: dict, acceptable: dict) -> bool:
    return value.keys() == acceptable.keys() and all(value_matches(value[k], acceptable[k]) for k in value)


def _same_name(got: str, expected: str) -> bool:
    return got == expected or got.replace(".", "_") == expected.replace(".", "_")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class _Expected:
    name: str
    arguments: Dict[str, Any]
    exact: bool  # ToolAlpaca: arguments must equal; BFCL: each argument lists its acceptable values


def _mismatch(call: Call, expected: _Expected) -> Optional[str]:
    """None when ``call`` satisfies ``expected``, else the reason it does not."""
    if not _same_name(call.name, expected.name):
        return f"called {call.name!r} instead of {expected.name!r}"
    if call.arguments is None:
        return f"the arguments of {call.name!r} are not valid JSON"
    if expected.exact:
        if call.arguments != expected.arguments:
            return f"{call.name!r} was called with {_short(call.arguments)}, expected {_short(expected.arguments)}"
        return None
    for arg, value in call.arguments.items():
        if arg not in expected.arguments:
            return f"unexpected argument {arg!r} in {call.name!r}"
        options = expected.arguments[arg]
        if not any(value_matches(value, option) for option in options):
            return f"argument {arg!r} of {call.name!r} is {_short(value)}, expected one of {_short(options)}"
    for arg, options in expected.arguments.items():
        if arg not in call.arguments and "" not in options:
            return f"missing required argument {arg!r} of {call.name!r}"
    return None


def _expected_calls(ground_truth: Any) -> List[_Expected]:
    if isinstance(ground_truth, (str, bytes)):
        ground_truth = json.loads(ground_truth)
    if isinstance(ground_truth, dict) and "ground_truth" in ground_truth:
        ground_truth = ground_truth["ground_truth"]
    if isinstance(ground_truth, dict) and "calls" in ground_truth:
        return [_Expected(str(c["name"]), dict(c.get("arguments") or {}), exact=True) for c in ground_truth["calls"]]
    if isinstance(ground_truth, dict):
        ground_truth = [ground_truth]
    expected = []
    for item in ground_truth:
        (name, arguments), = item.items()
        arguments = {str(k): (v if isinstance(v, list) else [v]) for k, v in arguments.items()}
        expected.append(_Expected(str(name), arguments, exact=False))
    return expected


def _max_matching(calls: List[Call], expected: List[_Expected]) -> Dict[int, int]:
    """The largest one-to-one matching of calls to expected calls, as {call index: expected index}."""
    fits = [[j for j, c in enumerate(calls) if _mismatch(c, e) is None] for e in expected]
    owner: Dict[int, int] = {}

    def augment(i: int, seen: set) -> bool:
        for j in fits[i]:
            if j not in seen:
                seen.add(j)
                if j not in owner or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    for i in range(len(expected)):
        augment(i, set())
    return owner


class ToolVerifier:
    """Scores the function calls in a response against BFCL possible answers or exact expected calls.

    Args:
        partial_credit: reward the fraction matched, (matched calls) / max(expected, made), instead of 1/0.
    """

    executor = "inline"

    def __init__(self, partial_credit: bool = False):
        self.partial_credit = partial_credit

    def __repr__(self) -> str:
        return f"ToolVerifier(partial_credit={self.partial_credit})"

    def __call__(self, response: str, ground_truth: Any) -> Score:
        try:
            expected = _expected_calls(ground_truth)
        except Exception:  # noqa: BLE001 - an odd ground truth scores 0, it never raises
            return Score(0.0, "Invalid ground truth for a tool call.")
        if not expected:
            return Score(0.0, "Invalid ground truth: no expected call.")
        try:
            calls = parse_calls(response)
        except RecursionError:
            calls = []
        if not calls:
            return Score(0.0, "No function call found in the response.")
        matching = _max_matching(calls, expected)
        if len(matching) == len(expected) == len(calls):
            return Score(1.0, None)
        reward = len(matching) / max(len(expected), len(calls)) if self.partial_credit else 0.0
        return Score(reward, self._feedback(calls, expected, matching))

    @staticmethod
    def _feedback(calls: List[Call], expected: List[_Expected], matching: Dict[int, int]) -> str:
        """Why the first unmatched expected call found no partner among the unmatched calls."""
        prefix = "" if len(calls) == len(expected) else f"Expected {len(expected)} call(s), got {len(calls)}; "
        unmatched = [e for i, e in enumerate(expected) if i not in matching.values()]
        spare = [c for j, c in enumerate(calls) if j not in matching]
        if not unmatched:
            reason = "the extra calls are not expected"
        else:
            target = unmatched[0]
            candidates = [c for c in spare if _same_name(c.name, target.name)] or spare
            reason = _mismatch(candidates[0], target) if candidates else f"no call to {target.name!r}"
        text = prefix + reason
        return text[:1].upper() + text[1:] + "."
