"""Self-BLEU-4 as the paper's code defines it, by hand, and logged with every training step."""

import math

import pytest

from mopd_lightning.diversity import bleu4, bleu_tokens, self_bleu


def test_bleu4_by_hand():
    """'a b c d' against 'a b c e': precisions (3+1)/(4+1), (2+1)/(3+1), (1+1)/(2+1), (0+1)/(1+1) (add-one on every
    order), equal lengths: no brevity penalty."""
    expected = (0.8 * 0.75 * (2 / 3) * 0.5) ** 0.25
    assert bleu4(list("abcd"), [list("abce")]) == pytest.approx(expected)
    assert bleu4(list("abcd"), [list("abcd")]) == pytest.approx((5 / 5 * 4 / 4 * 3 / 3 * 2 / 2) ** 0.25)
    # a short candidate pays the brevity penalty against the closest reference length (the shorter on a tie)
    assert bleu4(list("ab"), [list("abcd"), list("abcdef")]) == pytest.approx(
        math.exp(1 - 4 / 2) * ((3 / 3) * (2 / 2) * 1 * 1) ** 0.25)  # orders 3 and 4 absent: precision 1
    # the clip takes the largest count of an n-gram in any one reference, not their sum
    assert bleu4(list("aaaa"), [list("aab"), list("bab")]) == pytest.approx(
        ((2 + 1) / (4 + 1) * (1 + 1) / (3 + 1) * (0 + 1) / (2 + 1) * (0 + 1) / (1 + 1)) ** 0.25)  # longer: no penalty
    assert bleu4([], [list("ab")]) == 0.0 and bleu4(list("ab"), [[]]) == 0.0


def test_tokens_are_identifiers_digit_runs_and_symbols_and_code_is_its_last_block():
    assert bleu_tokens("x_1 = foo(42)+3.5") == ["x_1", "=", "foo", "(", "42", ")", "+", "3", ".", "5"]
    text = "First try:\n```python\nprint(1)\n```\nBetter:\n```Python\nprint(2)\n```\nDone."
    assert bleu_tokens(text, code=True) == ["print", "(", "2", ")"]
    assert bleu_tokens("no block here", code=True) == ["no", "block", "here"]


def test_self_bleu_is_one_for_a_collapsed_group_and_lower_for_a_diverse_one():
    same = ["The answer is B because water boils at 100 C."] * 4
    diverse = ["The answer is B.", "Water boils at 100 C, so C.", "I think it is D: steam.", "A, by elimination."]
    assert self_bleu(same) == pytest.approx(1.0)
    assert self_bleu(diverse) < 0.5
    assert self_bleu(same[:1]) is None


def test_every_training_step_logs_the_groups_self_bleu(tiny_model):
    from test_step import make, run

    trainer = run(make(tiny_model), steps=1)
    value = float(trainer.callback_metrics["train/self_bleu"])
    assert 0.0 < value < 1.0  # random rollouts of a random model: unlike one another, yet sharing tokens
