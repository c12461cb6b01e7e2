"""Math and science multiple-choice verifiers, strict (only the format the prompt asks for) and lenient."""

import json
import threading

import pytest

from mopd_lightning.rewards import Score, get_verifier, verify_batch
from mopd_lightning.rewards.math import extract_answer, last_boxed


@pytest.mark.parametrize(
    "response, ground_truth",
    [
        ("So the result is \\boxed{\\frac{1}{2}}.", "0.5"),
        ("\\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{1/2}", "1/2"),
        ("\\boxed{0.75}", "\\frac{3}{4}"),
        ("Therefore $x = \\boxed{2}$", "x=2"),
        ("\\boxed{x = 2}", "2"),
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}"),
        ("first \\boxed{3} then corrected: \\boxed{12}", "12"),
        ("\\boxed{12{,}000}", "12000"),
    ],
)
def test_equivalent_forms(response, ground_truth):
    assert get_verifier("math")(response, ground_truth) == Score(1.0, None)
    assert get_verifier("math", strict=False)(response, ground_truth) == Score(1.0, None)


@pytest.mark.parametrize("response, ground_truth", [
    ("The answer is $\\dfrac{3}{4}$.", "3/4"),
    ("We get 5 apples, then 7 more: 12", "12"),
])
def test_unboxed_answers_count_only_when_lenient(response, ground_truth):
    assert get_verifier("math", strict=False)(response, ground_truth) == Score(1.0, None)
    strict = get_verifier("math")(response, ground_truth)
    assert strict.reward == 0.0 and "boxed" in strict.feedback


@pytest.mark.parametrize(
    "response, ground_truth",
    [
        ("\\boxed{\\frac{1}{3}}", "0.5"),
        ("\\boxed{x = 3}", "x=2"),
        ("\\boxed{12} was wrong, the answer is \\boxed{13}", "12"),
        ("The answer is 7.", "12"),
    ],
)
def test_wrong_answers(response, ground_truth):
    score = get_verifier("math", strict=False)(response, ground_truth)
    assert score.reward == 0.0 and "incorrect" in score.feedback


def test_no_answer():
    score = get_verifier("math")("I am not sure how to solve this.", "12")
    assert score.reward == 0.0 and "boxed" in score.feedback


def test_extraction():
    assert last_boxed("\\boxed{\\frac{a}{b^{2}}} and \\boxed{x_{1}+\\{y\\}}") == "x_{1}+\\{y\\}"
    assert last_boxed("\\boxed 5 apples") == "5"
    assert last_boxed("cut off \\boxed{\\frac{1}{2") is None
    assert extract_answer("The final answer is: **42**.", strict=False) == "42"
    assert extract_answer("The final answer is: **42**.") is None
    assert extract_answer("nothing numeric", strict=False) is None


def test_math_from_a_thread_and_in_a_batch():
    """math-verify's alarm-based time limit only works in a main thread: other threads use worker processes."""
    results = []
    worker = threading.Thread(target=lambda: results.append(get_verifier("math")("\\boxed{0.5}", "1/2")))
    worker.start()
    worker.join()
    assert results == [Score(1.0, None)]
    responses = [f"\\boxed{{{i}}}" for i in range(40)]
    truths = [str(i if i % 2 else i + 1) for i in range(40)]
    scores = verify_batch("math", responses, truths)
    assert [s.reward for s in scores] == [float(i % 2) for i in range(40)]


SKE = {"choices": {"text": ["True", "False"], "label": ["A", "B"]}, "answerKey": "A", "type": "mcq-2-choices"}


@pytest.mark.parametrize(
    "response, ground_truth, strict, lenient",
    [
        ("<answer>B</answer>", "B", 1.0, 1.0),
        ("I think <answer>(C)</answer>", "C", 1.0, 1.0),
        ("<answer>A</answer> no wait <answer>D</answer>", "D", 1.0, 1.0),
        ("<answer>A</answer>", "B", 0.0, 0.0),
        ("<answer>Yes</answer>", "Yes", 1.0, 1.0),
        ("<answer>true</answer>", "Yes", 1.0, 1.0),
        ("<answer>No</answer>", "false", 1.0, 1.0),
        ("<answer>No.</answer>", False, 1.0, 1.0),
        ("<answer>Yes</answer>", "No", 0.0, 0.0),
        ("<answer>True</answer>", SKE, 1.0, 1.0),
        ("<answer>A</answer>", SKE, 1.0, 1.0),
        ("<answer>False</answer>", SKE, 0.0, 0.0),
        ("<answer>B</answer>", {"answer": "False", "choices": SKE["choices"]}, 1.0, 1.0),
        # Untagged answers: guesses a small model makes all the time, read only by the lenient verifier.
        ("No", "No", 0.0, 1.0),
        ("B.", "B", 0.0, 1.0),
        ("The answer is B", "B", 0.0, 1.0),
        ("B. 120 N\nbecause F = ma", "B", 0.0, 1.0),
        ("7325 - B is the correct one", "B", 0.0, 0.0),
        ("Apple. It is A", "A", 0.0, 0.0),
        # A final "Answer: C" or \boxed{C} (the 0.5B coder writes both) is read; naming more than one choice is not.
        ("Let me think. F = ma.\nAnswer: C", "C", 0.0, 1.0),
        ("The force is 120 N, so \\boxed{C}", "C", 0.0, 1.0),
        ("Answer: Yes", "Yes", 0.0, 1.0),
        ("A. Eriqin\nB. Awatahr\nC. Quarel\nD. Panjab", "A", 0.0, 0.0),  # every option listed, no answer
        ("A. 11 cm\nB. 0.11 m\nC. 0.011 m\n\nThe correct answer is:\nC. 0.011 m", "C", 0.0, 1.0),  # restated, answered
        ("A. 11 cm\nB. 0.11 m\nThe answer is B, or maybe the answer is A", "B", 0.0, 0.0),  # two statements
        ("C. Quarel\nAnswer: D. Panjab", "C", 0.0, 0.0),  # a leading label, then another answer
        ("C. Quarel\nAnswer: D. Panjab", "D", 0.0, 0.0),
        ("The answer is B.\nB. 120 N", "B", 0.0, 1.0),  # the same choice twice is one choice
        ("<answer>A or B</answer>", "A", 0.0, 0.0),
        ("<answer>B, C</answer>", "B", 0.0, 0.0),
        ("<answer>B. 120 N</answer>", "B", 1.0, 1.0),  # an option's text after its label is not a second choice
        # A hedge names several choices, stated or boxed: a two-letter one would succeed half the time.
        ("The answer is A or B.", "A", 0.0, 0.0),
        ("Answer: (A) or (B)", "A", 0.0, 0.0),
        ("\\boxed{A or B}", "A", 0.0, 0.0),
        ("The answer is A, C or D", "A", 0.0, 0.0),
        ("Answer: A/B", "A", 0.0, 0.0),
        ("So the answer is yes or no.", "Yes", 0.0, 0.0),
        ("The answer is A, because F = ma.", "A", 0.0, 1.0),  # a comma before prose is no second choice
        ("The answer is a compound of two atoms.", "A", 0.0, 0.0),  # an article, not the option
    ],
)
def test_sci(response, ground_truth, strict, lenient):
    assert get_verifier("sci")(response, ground_truth).reward == strict
    assert get_verifier("sci", strict=False)(response, ground_truth).reward == lenient


def test_no_hedge_is_a_success_in_either_mode():
    """Every way of stating two or three choices at once, each with either choice the right one: never a success,
    so a hedge cannot succeed half the time (a statement of one choice, the control, always does)."""
    import itertools

    verifiers = [get_verifier("sci"), get_verifier("sci", strict=False)]
    forms = ["The answer is {}.", "Answer: {}", "\\boxed{{{}}}", "<answer>{}</answer>", "So the answer is: {}"]
    lists = ["{0} or {1}", "({0}) or ({1})", "{0}/{1}", "{0}, {1}", "{0} and {1}", "{0} & {1}", "{0}, {1} or {2}"]
    for form, listed, (a, b, c) in itertools.product(forms, lists, [("A", "B", "C"), ("D", "A", "B")]):
        response = form.format(listed.format(a, b, c))
        for truth in (a, b, c):
            assert all(v(response, truth).reward == 0.0 for v in verifiers), (response, truth)
        assert verifiers[1](form.format(a), a).reward == 1.0, form  # the same form with one choice is read


def test_sci_on_sciknoweval_types(sciknoweval_dir):
    """Every SciKnowEval question type the project trains on: the key (or Yes/No answer) is accepted, others not."""
    rows = [json.loads(line) for path in sorted(sciknoweval_dir.rglob("*.jsonl")) for line in open(path)]
    by_type = {}
    for row in rows:
        by_type.setdefault(row["type"], row)
    assert {"mcq-4-choices", "mcq-2-choices", "true_or_false"} <= set(by_type)
    for kind in ("mcq-4-choices", "mcq-2-choices", "true_or_false"):
        row = by_type[kind]
        right = row["answerKey"] or row["answer"]
        wrong = next(c for c in (row["choices"]["label"] or ["Yes", "No"]) if c != right)
        assert get_verifier("sci")(f"<answer>{right}</answer>", row).reward == 1.0, kind
        assert get_verifier("sci")(f"<answer>{wrong}</answer>", row).reward == 0.0, kind
        assert get_verifier("sci")(f"<answer>{right}</answer>", right).reward == 1.0, kind


@pytest.mark.parametrize("response, strict, span", [
    ("Thinking... <answer>B</answer>", True, "B"),
    ("B. 120 N\nbecause F = ma", False, "B"),
    ("so the answer is C.", False, "C"),
    ("\\boxed{D}", False, "D"),
    ("no answer here", False, None),
    ("B. 120 N", True, None),
])
def test_sci_answer_span_is_where_the_choice_was_read(response, strict, span):
    from mopd_lightning.rewards.sci import answer_span

    found = answer_span(response, strict)
    assert (response[found[0]:found[1]] if found else None) == span


@pytest.mark.parametrize("response, strict, span", [
    ("So x = 6, and the total is \\boxed{42}.", True, "42"),
    ("The answer is 7/2", False, "7/2"),
    ("The answer is 7/2", True, None),
])
def test_math_answer_span_is_the_final_answer(response, strict, span):
    from mopd_lightning.rewards.math import answer_span

    found = answer_span(response, strict)
    assert (response[found[0]:found[1]] if found else None) == span


@pytest.mark.parametrize("response", [
    "So 3 + 4 = \\boxed{7}. <summary>Add them to get 7.</summary>",
    "\\boxed{12}. So 12 apples remain.",
    "We get \\boxed{x = 2}, i.e. x = 2.",
    "\\boxed{\\frac{1}{2}} and \\frac{1}{2} is the share.",
    "First \\boxed{3}, then \\boxed{5}: 5 is final, not 3.",
    "\\boxed 9 and 9 again",
])
def test_math_answer_span_is_inside_the_box_the_verifier_read(response):
    """Not a later mention of the same text (a summary, a restatement): the span is the last box's content."""
    from mopd_lightning.rewards.math import answer_span, extract_answer

    start, end = answer_span(response)
    box = response.rindex("\\boxed")
    assert box < start and response[start:end] == extract_answer(response)
    braced = response[box + len("\\boxed")] == "{"
    assert response[end] == "}" if braced else response[box:start] == "\\boxed "  # the box's own content


def test_code_answer_span_is_the_program():
    from mopd_lightning.rewards.code import answer_span

    response = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    start, end = answer_span(response)
    assert response[start:end].strip() == "def add(a, b):\n    return a + b"
