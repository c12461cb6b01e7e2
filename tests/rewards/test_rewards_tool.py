"""The tool-use verifier on BFCL's own possible answers (accepted) and on altered ones (rejected)."""

import json

import pytest

from mopd_lightning.rewards import ToolVerifier, get_verifier
from mopd_lightning.rewards.tool import parse_calls, value_matches

OMIT = object()


def render(value):
    """A concrete value from BFCL's acceptable-value structure: the first acceptable choice at every level."""
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        rendered = {k: render(first(v)) for k, v in value.items()}
        return {k: v for k, v in rendered.items() if v is not OMIT}
    if isinstance(value, list):
        return [render(v) for v in value]
    return value


def first(options):
    return OMIT if options[0] == "" else options[0]


def concrete_calls(ground_truth):
    calls = []
    for item in ground_truth:
        (name, args), = item.items()
        arguments = {k: render(first(v)) for k, v in args.items()}
        calls.append((name, {k: v for k, v in arguments.items() if v is not OMIT}))
    return calls


def as_python(calls):
    text = ", ".join(f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})" for name, args in calls)
    return f"[{text}]"


def as_json(calls):
    return json.dumps([{"name": name, "arguments": args} for name, args in calls])


def as_bfcl_json(calls):
    return "```json\n" + json.dumps([{name: args} for name, args in calls]) + "\n```"


def wrong_value(value, options):
    """A value of the same kind that none of the acceptable options equals."""
    if isinstance(value, bool):
        candidate = not value
    elif isinstance(value, (int, float)):
        candidate = value + 1000003
    elif isinstance(value, str):
        candidate = value + " zz wrong"
    elif isinstance(value, list):
        candidate = value + ["zz-extra"]
    elif isinstance(value, dict):
        candidate = {**value, "zz_unexpected_key": 1}
    else:
        candidate = "zz wrong"
    assert not any(value_matches(candidate, o) for o in options)
    return candidate


@pytest.mark.parametrize("category", ["simple_python", "multiple", "parallel"])
def test_bfcl_possible_answers_are_accepted_and_alterations_rejected(bfcl, category):
    verify = get_verifier("tool")
    entries = bfcl(category)
    assert len(entries) >= 200
    rejected_missing = 0
    for question, answer in entries:
        truth = answer["ground_truth"]
        calls = concrete_calls(truth)
        for render_fn in (as_python, as_json, as_bfcl_json):
            score = verify(render_fn(calls), truth)
            assert score.reward == 1.0, (question["id"], render_fn.__name__, score.feedback, render_fn(calls))
        assert verify(as_python(calls[::-1]), truth).reward == 1.0, question["id"]  # any order

        name, args = calls[-1]
        altered = calls[:-1] + [(name + "_v2", args)]
        assert verify(as_python(altered), truth).reward == 0.0, question["id"]

        expected_args = list(truth[-1].values())[0]
        arg = next((a for a in args if expected_args[a] != [""]), None)
        if arg is not None:
            altered_args = {**args, arg: wrong_value(args[arg], expected_args[arg])}
            score = verify(as_python(calls[:-1] + [(name, altered_args)]), truth)
            assert score.reward == 0.0 and arg in score.feedback, (question["id"], score)

        required = [a for a, options in expected_args.items() if "" not in options]
        if required:
            reduced = {k: v for k, v in args.items() if k != required[0]}
            score = verify(as_json(calls[:-1] + [(name, reduced)]), truth)
            assert score.reward == 0.0 and "missing" in score.feedback.lower(), (question["id"], score)
            rejected_missing += 1
    assert rejected_missing > len(entries) // 2


BFCL_TRUTH = [{"get_weather": {"city": ["Paris", "Paris, France"], "unit": ["celsius", ""]}},
              {"get_time": {"zone": ["CET"]}}]


@pytest.mark.parametrize(
    "response",
    [
        'I will call both. [get_weather(city="paris"), get_time(zone="CET")]',
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris, France", "unit": "Celsius"}}\n</tool_call>',
        json.dumps({"tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}},
            {"type": "function", "function": {"name": "get_time", "arguments": json.dumps({"zone": "CET"})}},
        ]}),
        "Thinking about {braces} first.\n```python\nget_weather(city='Paris')\nget_time(zone='CET')\n```",
        'Calls: {"get_weather": {"city": "Paris"}} then {"get_time": {"zone": "CET"}}.',
    ],
)
def test_call_formats(response):
    assert get_verifier("tool")(response, BFCL_TRUTH) == get_verifier("tool")("", BFCL_TRUTH).__class__(1.0, None)


@pytest.mark.parametrize(
    "response, spans",
    [
        ('I will call both. [get_weather(city="paris"), get_time(zone="CET")] Done.',
         '[get_weather(city="paris"), get_time(zone="CET")]'),
        ('<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>\nand\n<tool_call>'
         '{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call> ok',
         '{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>\nand\n<tool_call>'
         '{"name": "get_weather", "arguments": {"city": "Paris"}}'),
        ("Thinking about {braces} first.\n```python\nget_weather(city='Paris')\nget_time(zone='CET')\n```\nBye",
         "get_weather(city='Paris')\nget_time(zone='CET')"),
        ('Calls: {"get_weather": {"city": "Paris"}} then {"get_time": {"zone": "CET"}}.',
         '{"get_weather": {"city": "Paris"}} then {"get_time": {"zone": "CET"}}'),
        ('Thought: weather\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation: sunny',
         'Action: get_weather\nAction Input: {"city": "Paris"}'),
        ("Let me think about the weather.", None),
    ],
)
def test_the_answer_span_is_where_the_calls_were_read(response, spans):
    """The tool domain's answer span (``model.loss.tokens: answer``, the analysis's answer-span score): from the
    first call read to the last, whatever format carried them; none without a call."""
    from mopd_lightning.rewards.registry import ANSWER_SPANS

    found = ANSWER_SPANS["tool"](response, True, None)
    assert (response[found[0]:found[1]] if found else None) == spans


@pytest.mark.parametrize(
    "response, fragment",
    [
        ("[get_weather(city='Paris')]", "expected 2"),
        ("[get_weather(city='Rome'), get_time(zone='CET')]", "'city'"),
        ("[get_weather(city='Paris', extra=1), get_time(zone='CET')]", "unexpected argument 'extra'"),
        ("[get_weather('Paris'), get_time(zone='CET')]", "positional"),
        ("[get_weather(unit='celsius'), get_time(zone='CET')]", "missing required argument 'city'"),
        ("Let me think about the weather.", "no function call"),
    ],
)
def test_mismatches_explained(response, fragment):
    score = get_verifier("tool")(response, BFCL_TRUTH)
    assert score.reward == 0.0
    assert fragment.lower() in score.feedback.lower()


def test_values_follow_bfcl_rules():
    assert value_matches(5, 5.0) and value_matches(5.0, 5)
    assert not value_matches(True, 1) and not value_matches(1, True)
    assert value_matches("New York, NY", "new york ny")
    assert not value_matches("5", 5)
    assert value_matches([1, "A b"], [1.0, "ab"])
    assert value_matches({"min": 3}, {"min": [3], "max": [""]})
    assert not value_matches({"min": 3, "other": 1}, {"min": [3], "max": [""]})


def test_partial_credit_for_parallel_calls():
    response = "[get_weather(city='Paris'), get_time(zone='UTC')]"
    assert ToolVerifier()(response, BFCL_TRUTH).reward == 0.0
    assert ToolVerifier(partial_credit=True)(response, BFCL_TRUTH).reward == 0.5


def test_toolalpaca_actions_exact_match():
    truth = {"calls": [{"name": "searchBooks", "arguments": {"query": "dune", "limit": 5}},
                       {"name": "getBook", "arguments": {"id": "42"}}]}
    response = (
        "Thought: I need to search first.\nAction: searchBooks\nAction Input: {\"query\": \"dune\", \"limit\": 5}\n"
        "Observation: ...\nAction: getBook\nAction Input: {\"id\": \"42\"}\n"
    )
    assert get_verifier("tool")(response, truth).reward == 1.0
    assert get_verifier("tool")(response.replace('"42"', '"43"'), truth).reward == 0.0
    assert get_verifier("tool")(response.replace("Input: {\"id", "Input: {id"), truth).reward == 0.0


def test_nested_braces_inside_json_strings():
    truth = [{"render": {"template": ["{a} and {b}"], "values": [{"a": ["1"], "b": ["2"]}]}}]
    response = 'Result: {"name": "render", "arguments": {"template": "{a} and {b}", "values": {"a": "1", "b": "2"}}}'
    assert get_verifier("tool")(response, truth).reward == 1.0
    assert [c.name for c in parse_calls(response)] == ["render"]


@pytest.mark.parametrize("truth", [None, 7, "not json", [], [{"a": 1, "b": 2}], {"calls": "x"}, [[1]]])
def test_odd_ground_truths_score_zero(truth):
    score = get_verifier("tool")("f(a=1)", truth)
    assert score.reward == 0.0 and score.feedback
