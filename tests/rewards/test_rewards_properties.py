"""No verifier raises, whatever the model writes and whatever odd ground truth a dataset holds."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mopd_lightning.rewards import Score, get_verifier, verify_batch

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# Text that looks like what the parsers look for, so the interesting branches run, not only the "nothing found" one.
fragments = st.sampled_from(
    ["\\boxed{", "}", "{", "$", "answer is", "<answer>", "</answer>", "```python\n", "```", "(", ")", "[", "]",
     '{"name": "f", "arguments": {', '"a": 1', "f(a=1", "Action: f\n", "Action Input: ", "<tool_call>",
     "</tool_call>", "\\frac{1}{2}", "1/0", "x=", "\n", " ", "'", '"', "\\", "True", "None", "import os"]
)
responses = st.one_of(st.text(max_size=300), st.lists(fragments | st.text(max_size=5), max_size=40).map("".join))
GROUND_TRUTHS = {
    "sci": st.one_of(json_values, st.sampled_from(["A", "b", "Yes", "no", "TRUE", ""])),
    "math": st.one_of(json_values, st.sampled_from(["3/4", "\\frac{3}{4}", "x=2", "12", "\\", "{", ""])),
    "tool": st.one_of(
        json_values,
        st.lists(st.dictionaries(st.text(max_size=6), st.dictionaries(st.text(max_size=4), json_values, max_size=3),
                                 min_size=1, max_size=1), max_size=3),
    ),
}


def _check(score):
    assert isinstance(score, Score)
    assert 0.0 <= score.reward <= 1.0
    assert score.feedback is None or isinstance(score.feedback, str)


@pytest.mark.parametrize("name", ["sci", "math", "tool"])
def test_never_raises(name):
    verifier = get_verifier(name)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(response=responses, ground_truth=GROUND_TRUTHS[name])
    def check(response, ground_truth):
        _check(verifier(response, ground_truth))

    check()


code_truths = st.one_of(
    json_values,
    st.fixed_dictionaries({"kind": st.sampled_from(["stdio", "functional", "humaneval", "other"])}, optional={
        "tests": st.lists(st.fixed_dictionaries({"input": st.text(max_size=10), "output": st.text(max_size=10)}),
                          max_size=2),
        "fn_name": st.text(max_size=5), "prompt": st.text(max_size=20), "test": st.text(max_size=20),
        "entry_point": st.text(max_size=5)}),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(response=responses, ground_truth=code_truths)
def test_code_verifier_never_raises(response, ground_truth):
    _check(get_verifier("code")(response, ground_truth))


@settings(max_examples=30, deadline=None)
@given(response=st.one_of(st.none(), st.integers(), st.binary(max_size=10), st.lists(st.text(max_size=3))))
def test_non_text_responses_score_zero(response):
    for name in ("sci", "math", "tool", "code"):
        score = get_verifier(name)(response, "A" if name != "code" else {"kind": "stdio", "tests": []})
        _check(score)
        assert score.reward == 0.0


def test_batch_keeps_order_and_survives_a_raising_callable():
    def flaky(response, ground_truth):
        if response == "boom":
            raise RuntimeError("bug in a custom verifier")
        return Score(float(response == ground_truth))

    scores = verify_batch(flaky, ["a", "boom", "c", "d"], ["a", "b", "x", "d"], max_workers=2)
    assert [s.reward for s in scores] == [1.0, 0.0, 0.0, 1.0]
    assert "RuntimeError" in scores[1].feedback
    with pytest.raises(ValueError):
        verify_batch("sci", ["a"], [])
    assert verify_batch("sci", [], []) == []


ADVERSARIAL = ["\\boxed{", "\\boxed", "{", "}", "[", "(", "f(", "'", "```", "```python", "<answer>", "answer is ",
               "Action: x\n", "Action Input: ", "<tool_call>", "1,", "\\frac{1}{", '{"a":', "[1,", "x(a=[", "\\"]


@pytest.mark.parametrize("name", ["sci", "math", "tool"])
def test_adversarial_text_stays_fast(name):
    """100,000 characters of one repeated fragment: no parser may go quadratic (a rollout must not stall a step).
    CPU time, not wall time, so a busy machine does not fail it (linear parsers take about 0.05 s here)."""
    import time

    truth = {"sci": "A", "math": "3", "tool": [{"f": {"a": [1]}}]}[name]
    for fragment in ADVERSARIAL:
        text = (fragment * (100_000 // len(fragment) + 1))[:100_000]
        start = time.process_time()
        _check(get_verifier(name)(text, truth))
        assert time.process_time() - start < 3.0, fragment
