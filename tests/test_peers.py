import pytest
from transformers import AutoTokenizer

from mopd_lightning.config import PeerConfig
from mopd_lightning.data.example import Example
from mopd_lightning.peers import build_teacher_contexts, choose_peers, fill, truncate_middle


def test_leave_one_out_and_counts():
    success = [True, True, True, False, False, True, False, True]
    for i, choice in enumerate(choose_peers(success, PeerConfig(n_success=2, n_failure=1), "k")):
        assert i not in choice.successes + choice.failures
        assert len(choice.successes) == 2 and len(choice.failures) == 1
        assert all(success[j] for j in choice.successes) and not any(success[j] for j in choice.failures)
        assert len(set(choice.successes)) == len(choice.successes)


def test_counts_capped_by_what_the_group_has():
    success = [True, False, False]
    choices = choose_peers(success, PeerConfig(n_success=2, n_failure=2), "k")
    assert choices[0].successes == [] and sorted(choices[0].failures) == [1, 2]  # the only success is itself
    assert choices[1].successes == [0] and choices[1].failures == [2]


def test_failure_when_no_success():
    config = PeerConfig(n_success=1, n_failure=1, failure_when="when_no_success")
    choices = choose_peers([True, True, False, False], config, "k")
    assert choices[0].failures == [] and choices[0].successes == [1]
    assert choices[2].failures == [] and len(choices[2].successes) == 1
    only_failures = choose_peers([False, False, False], config, "k")
    assert all(len(c.failures) == 1 and not c.successes for c in only_failures)


def test_rollout_without_peers_is_inactive():
    config = PeerConfig(n_success=2, n_failure=0)  # positive peer imitation
    choices = choose_peers([True, False, False], config, "k")
    assert choices[0].count == 0  # the only success cannot be its own peer
    assert choices[1].successes == [0]


def test_same_seed_same_peers_other_seed_differs():
    success = [True] * 6 + [False] * 6
    config = PeerConfig(n_success=2, n_failure=2)
    a = choose_peers(success, config, "seed-1")
    assert a == choose_peers(success, config, "seed-1")
    assert a != choose_peers(success, config, "seed-2")
    firsts = {tuple(c.successes) for c in choose_peers(success, config, "seed-1")}
    assert len(firsts) > 1, "peers must be drawn at random, not always the first success"


def test_fill_leaves_braces_in_values():
    assert fill("{question}|{peers}", question="f(x) = {x}", peers="\\boxed{2}") == "f(x) = {x}|\\boxed{2}"


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_truncate_middle_keeps_head_and_tail(tokenizer):
    ids = tokenizer.encode("Here is a correct solution from another attempt. " * 20)
    text, cut = truncate_middle(ids, 20, tokenizer, "[..{n}..]")
    assert cut and f"[..{len(ids) - 20}..]" in text
    assert text.startswith(tokenizer.decode(ids[:10])) and text.endswith(tokenizer.decode(ids[-10:]))
    assert truncate_middle(ids[:5], 20, tokenizer, "[..{n}..]") == (tokenizer.decode(ids[:5]), False)


def test_truncation_never_cuts_question_or_closing(tokenizer):
    example = Example("q1", [{"role": "system", "content": "SYS"}, {"role": "user", "content": "QUESTION?"}], "A", "mcq")
    long = tokenizer.encode("def add(a, b): return a + b " * 50)
    responses = [long + [tokenizer.eos_token_id], long, tokenizer.encode("short")]
    config = PeerConfig(n_success=1, n_failure=1, max_peer_tokens=16)
    contexts = build_teacher_contexts(example, responses, [True, True, False], [None, None, "wrong"], tokenizer,
                                      config, "k")
    closing = "Now solve the original question above correctly"
    for context in contexts:
        text = tokenizer.decode(context.prompt_ids)
        assert text.startswith("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQUESTION?")
        assert closing in text and text.endswith("<|im_start|>assistant\n")
        assert "Feedback" not in text  # feedback is off by default
    assert contexts[2].truncated_peers == 1 and "tokens omitted" in tokenizer.decode(contexts[2].prompt_ids)


def test_feedback_only_when_enabled(tokenizer):
    example = Example("q", [{"role": "user", "content": "Q"}], "A", "mcq")
    config = PeerConfig(n_success=0, n_failure=1, include_feedback=True)
    contexts = build_teacher_contexts(example, [tokenizer.encode("a"), tokenizer.encode("b")], [False, False],
                                      ["bad format", "bad format"], tokenizer, config, "k")
    assert "Feedback on that attempt: bad format" in tokenizer.decode(contexts[0].prompt_ids)


@pytest.mark.parametrize("field,kwargs", [
    ("model.peers", {"n_success": 0, "n_failure": 0}),
    ("model.peers.failure_when", {"failure_when": "sometimes"}),
    ("model.peers.context_template", {"context_template": "no fields"}),
])
def test_bad_peer_config_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        PeerConfig(**kwargs)
