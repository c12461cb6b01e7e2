"""The code verifier on real HumanEval problems and on the three test shapes (HumanEval, stdio, functional)."""

import json
import re
import time

import pytest

from mopd_lightning.rewards import CodeVerifier, get_verifier, verify_batch
from mopd_lightning.rewards.code import extract_code


def _ground_truth(problem: dict) -> dict:
    keys = ("prompt", "test", "entry_point")
    return {"kind": "humaneval", **{k: problem[k] for k in keys}}


def _full_function(problem: dict) -> str:
    """The canonical solution written the way chat models answer: the whole function in a fenced block."""
    return f"Here is my solution:\n```python\n{problem['prompt']}{problem['canonical_solution']}```\nDone."


def test_humaneval_canonical_solutions_pass_and_broken_ones_fail(humaneval):
    assert len(humaneval) == 164
    truths = [_ground_truth(p) for p in humaneval]
    start = time.monotonic()
    canonical = verify_batch("code", [p["canonical_solution"] for p in humaneval], truths)
    fenced = verify_batch("code", [_full_function(p) for p in humaneval], truths)
    broken = verify_batch("code", ["    return None\n"] * len(humaneval), truths)
    elapsed = time.monotonic() - start

    failed = [(p["task_id"], s.feedback) for p, s in zip(humaneval, canonical) if s.reward != 1.0]
    assert failed == []
    failed = [(p["task_id"], s.feedback) for p, s in zip(humaneval, fenced) if s.reward != 1.0]
    assert failed == []
    passed = [p["task_id"] for p, s in zip(humaneval, broken) if s.reward != 0.0]
    assert passed == []
    assert all(s.feedback for s in broken)
    assert elapsed < 60, f"3 x 164 HumanEval programs took {elapsed:.1f}s"


def test_humaneval_rejects_early_exit(humaneval):
    """Exiting with status 0 before the tests ran is not a pass (a known reward hack)."""
    problem = humaneval[0]
    hack = "    import sys\n    sys.exit(0)\n"
    assert get_verifier("code")(hack, _ground_truth(problem)).reward == 0.0
    hack = "    import os\n    os._exit(0)\n"
    assert get_verifier("code")(hack, _ground_truth(problem)).reward == 0.0


def test_humaneval_full_function_may_use_prompt_helpers(humaneval):
    """HumanEval/38 (decode_cyclic) calls the prompt's encode_cyclic helper: a full function must still see it."""
    problem = next(p for p in humaneval if p["entry_point"] == "decode_cyclic")
    response = "```python\ndef decode_cyclic(s: str):\n    return encode_cyclic(encode_cyclic(s))\n```"
    assert get_verifier("code")(response, _ground_truth(problem)).reward == 1.0


@pytest.mark.parametrize(
    "response, expected",
    [
        ("```python\nprint(1)\n```", "print(1)\n"),
        ("```\nA\n```\ntext\n```py\nB\n```", "B\n"),
        ("```python\nA\n```\n```bash\nls\n```", "A\n"),
        ("no fence at all", "no fence at all"),
        ("Sure!\n```python\nunclosed = 1\n", "unclosed = 1\n"),
    ],
)
def test_extract_code(response, expected):
    assert extract_code(response) == expected


STDIO = {
    "kind": "stdio",
    "tests": [
        {"input": "1 2\n", "output": "3\n"},
        {"input": "10 20\n", "output": "30"},
        {"input": "-5   5\n", "output": "  0  \n\n"},
    ],
}


def test_stdio_fraction_and_all_or_nothing():
    right = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    wrong_on_negatives = "```python\na, b = map(int, input().split())\nprint(abs(a) + abs(b))\n```"
    assert get_verifier("code")(right, STDIO).reward == 1.0
    score = get_verifier("code")(wrong_on_negatives, STDIO)
    assert score.reward == pytest.approx(2 / 3)
    assert "Test 3" in score.feedback and "expected" in score.feedback and "10" in score.feedback
    assert CodeVerifier(all_or_nothing=True)(wrong_on_negatives, STDIO).reward == 0.0


def test_stdio_whitespace_normalisation_keeps_lines_apart():
    gt = {"kind": "stdio", "tests": [{"input": "", "output": "1 2\n3"}]}
    assert get_verifier("code")("print('1   2 ')\nprint(' 3')", gt).reward == 1.0
    assert get_verifier("code")("print('1 2 3')", gt).reward == 0.0


def test_verl_layout_inputs_outputs():
    gt = json.dumps({"inputs": ["2\n", "5\n"], "outputs": ["4\n", "25\n"]})
    assert get_verifier("code")("n = int(input())\nprint(n * n)", gt).reward == 1.0


FUNCTIONAL = {
    "kind": "functional",
    "fn_name": "join",
    "tests": [
        {"input": '"a b"\n["x y", "z"]', "output": '"a b|x y|z"'},
        {"input": '""\n[]', "output": '""'},
        {"input": '"q"\n["1 2 3"]', "output": '"q|1 2 3"'},
    ],
}


@pytest.mark.parametrize(
    "code",
    [
        "def join(head, rest):\n    return '|'.join([head] + rest)",
        "class Solution:\n    def join(self, head: str, rest: List[str]) -> str:\n"
        "        return '|'.join([head] + rest)",
    ],
)
def test_functional_arguments_are_json_lines_never_split_on_spaces(code):
    """Arguments containing spaces survive intact: one JSON value per line (the reference code split on spaces)."""
    score = get_verifier("code")(f"```python\n{code}\n```", FUNCTIONAL)
    assert score == score.__class__(1.0, None)


def test_functional_partial_credit_and_feedback():
    code = (
        "def join(head, rest):\n    if not rest:\n        raise ValueError('empty')\n"
        "    return '|'.join([head] + rest)"
    )
    score = get_verifier("code")(code, FUNCTIONAL)
    assert score.reward == pytest.approx(2 / 3)
    assert re.search(r"Test 2 failed.*ValueError: empty", score.feedback)


def test_functional_values_compared_by_the_verifier_not_printed_text():
    """Printing the expected text does not pass: only returned values count."""
    gt = {"kind": "functional", "fn_name": "f", "tests": [{"input": "1", "output": "2"}]}
    assert get_verifier("code")("def f(x):\n    print(2)\n    return x + 1", gt).reward == 1.0
    assert get_verifier("code")("def f(x):\n    print(2)\n    return 7", gt).reward == 0.0
    assert get_verifier("code")("def g(x):\n    return 2", gt).reward == 0.0


def test_functional_timeout_is_per_test():
    gt = {"kind": "functional", "fn_name": "f", "tests": [{"input": "1", "output": "1"}, {"input": "0", "output": "0"}]}
    code = "def f(x):\n    while not x:\n        pass\n    return x"
    start = time.monotonic()
    score = CodeVerifier(timeout_s=1.0)(code, gt)
    assert score.reward == 0.5 and "timed out" in score.feedback
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    "ground_truth",
    [None, 3, "not json", "[1, 2]", {"kind": "nope"}, {"kind": "stdio"}, {"kind": "stdio", "tests": []},
     {"kind": "functional", "fn_name": "f", "tests": [{"input": "1 2", "output": "3"}]},
     {"inputs": [1], "outputs": []}, {"kind": "humaneval", "prompt": "def f():\n"}],
)
def test_odd_ground_truths_score_zero_with_feedback(ground_truth):
    score = get_verifier("code")("print(1)", ground_truth)
    assert score.reward == 0.0 and score.feedback
