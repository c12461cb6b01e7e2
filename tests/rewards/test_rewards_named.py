"""The ``named`` verifier: an option answered by its name, as ``facts_named`` asks."""

import pytest

from mopd_lightning.data.domains import DOMAINS
from mopd_lightning.rewards import get_verifier

TRUTH = {"answer": "Jorel Festival", "options": ["Beldun Festival", "Jorel Festival", "Orfen", "Corfen"]}
WRONG_TRUTH = dict(TRUTH, answer="Orfen")


@pytest.mark.parametrize("response,lenient,strict", [
    ("<answer>Jorel Festival</answer>", 1.0, 1.0),
    ("Think: it is the frost one. <answer> jorel festival </answer>", 1.0, 1.0),  # case and spaces
    ("Jorel Festival", 1.0, 0.0),  # no tag: lenient reads the whole response
    ("The answer is Jorel Festival.", 1.0, 0.0),
    ("Jorel", 0.0, 0.0),  # part of a name is not the name
    ("Jorel Festivals", 0.0, 0.0),  # not the whole word
    ("Beldun Festival or Jorel Festival", 0.0, 0.0),  # two options: none chosen
    ("Jorel Festival. <answer>Beldun Festival</answer>", 0.0, 0.0),  # the tag, where there is one, decides
    ("<answer>Beldun Festival</answer>", 0.0, 0.0),
    ("", 0.0, 0.0),
])
def test_a_response_succeeds_when_it_names_exactly_the_right_option(response, lenient, strict):
    assert get_verifier("named", strict=False)(response, TRUTH).reward == lenient
    assert get_verifier("named", strict=True)(response, TRUTH).reward == strict


def test_a_name_inside_another_is_not_named():
    verify = get_verifier("named", strict=False)
    assert verify("Corfen", WRONG_TRUTH).reward == 0.0  # "Orfen" is a part of "Corfen", not named by it
    assert verify("Orfen", WRONG_TRUTH).reward == 1.0


@pytest.mark.parametrize("truth", [None, "B", {"answer": "X", "options": ["A", "B"]}, {"answer": "A"},
                                   {"answer": "A", "options": ["A", ""]}])
def test_an_odd_ground_truth_scores_zero_and_says_why(truth):
    score = get_verifier("named")("<answer>A</answer>", truth)
    assert score.reward == 0.0 and "ground truth" in score.feedback


def test_every_embedded_named_question_scores_only_its_right_option():
    for split in ("train", "validation", "test"):
        for example in DOMAINS["facts_named"].embedded(split, 0, None):
            verify = get_verifier(example.verifier, strict=True)
            assert example.ground_truth["answer"] == example.meta["fact"]
            for option in example.ground_truth["options"]:
                assert option in example.question and "A. " not in example.question
                assert verify(f"<answer>{option}</answer>", example.ground_truth).reward == float(
                    option == example.meta["fact"])


@pytest.mark.parametrize("response,strict,read", [
    ("Think. <answer> Jorel Festival </answer>", True, "Jorel Festival"),
    ("Jorel Festival, I think: Jorel Festival.", False, "Jorel Festival"),  # the last mention
    ("Jorel Festival", True, None),  # strict reads only the tag
    ("Beldun Festival or Jorel Festival", False, None),  # several options: no answer read
    ("Jorel", False, None),
])
def test_the_answer_span_is_where_the_name_was_read(response, strict, read):
    from mopd_lightning.rewards.registry import ANSWER_SPANS

    found = ANSWER_SPANS["named"](response, strict, TRUTH)
    assert (response[found[0]:found[1]].strip() if found else None) == read
    assert ANSWER_SPANS["named"](response, False, None) == (found if "<answer>" in response else None)
