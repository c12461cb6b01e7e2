from dataclasses import replace

import pytest
from transformers import AutoTokenizer

from mopd_lightning.config import PeerConfig
from mopd_lightning.data.example import Example
from mopd_lightning.peers import build_teacher_contexts, choose_peers, fill, truncate_middle
from mopd_lightning.rewards import Score
from mopd_lightning.rollouts import Rollouts


def pick(success, config, key="k"):
    """Peers of each rollout of one group, as (indices shown as successes, indices shown as failures)."""
    peers = choose_peers([list(range(len(success)))], success, config, [key])
    return [([p.rollout for p in ps if p.shown_success], [p.rollout for p in ps if not p.shown_success]) for ps in peers]


def test_leave_one_out_and_counts():
    success = [True, True, True, False, False, True, False, True]
    for i, (successes, failures) in enumerate(pick(success, PeerConfig(n_success=2, n_failure=1))):
        assert i not in successes + failures
        assert len(successes) == 2 and len(failures) == 1
        assert all(success[j] for j in successes) and not any(success[j] for j in failures)
        assert len(set(successes)) == len(successes)


def test_counts_capped_by_what_the_group_has():
    choices = pick([True, False, False], PeerConfig(n_success=2, n_failure=2))
    assert choices[0][0] == [] and sorted(choices[0][1]) == [1, 2]  # the only success is itself
    assert choices[1] == ([0], [2])


def test_failure_when_no_success():
    config = PeerConfig(n_success=1, n_failure=1, failure_when="when_no_success")
    choices = pick([True, True, False, False], config)
    assert choices[0] == ([1], [])
    assert choices[2][1] == [] and len(choices[2][0]) == 1
    assert all(len(f) == 1 and not s for s, f in pick([False, False, False], config))


def test_rollout_without_peers_is_inactive():
    choices = pick([True, False, False], PeerConfig(n_success=2, n_failure=0))  # positive peer imitation
    assert choices[0] == ([], [])  # the only success cannot be its own peer
    assert choices[1] == ([0], [])


def test_same_seed_same_peers_other_seed_differs():
    success = [True] * 6 + [False] * 6
    config = PeerConfig(n_success=2, n_failure=2)
    a = pick(success, config, "seed-1")
    assert a == pick(success, config, "seed-1")
    assert a != pick(success, config, "seed-2")
    assert len({tuple(s) for s, _ in a}) > 1, "peers must be drawn at random, not always the first success"


# -- ablation controls ----------------------------------------------------------------------------------------
GROUPS = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
SUCCESS = [True, False, False, False, True, True, False, False, False, False, False, False]


def test_context_none_has_no_peers():
    peers = choose_peers(GROUPS, SUCCESS, PeerConfig(context="none"), ["a", "b", "c"])
    assert peers == [[] for _ in SUCCESS]


def test_random_peer_ignores_labels_in_choosing_and_in_showing():
    """The 2S1F slots filled with random peers of the group and labelled by slot (as the reference's control): what
    the teacher is told about a peer says nothing about it."""
    config = PeerConfig(n_success=2, n_failure=1, context="random_peer")
    seen, told = set(), {True: [], False: []}
    for seed in range(60):
        for i, peers in enumerate(choose_peers(GROUPS, SUCCESS, config, [f"{seed}:{g}" for g in range(3)])):
            assert len(peers) == 3 and i not in [p.rollout for p in peers]
            assert all(p.rollout in GROUPS[i // 4] for p in peers)
            assert [p.shown_success for p in peers] == [True, True, False]
            for p in peers:
                seen.add((i, p.rollout))
                told[p.shown_success].append(SUCCESS[p.rollout])
    assert (1, 2) in seen and (1, 0) in seen  # a failure of group 0 may be shown failures and successes alike
    shown_correct = sum(told[True]) / len(told[True])  # true successes among the peers shown as correct ...
    assert abs(shown_correct - sum(told[False]) / len(told[False])) < 0.1  # ... as often as among those shown not


def test_unrelated_prompt_shows_the_mix_from_other_prompts_truly_labelled():
    config = PeerConfig(n_success=2, n_failure=1, context="unrelated_prompt")
    peers = choose_peers(GROUPS, SUCCESS, config, ["a", "b", "c"])
    for i, chosen in enumerate(peers):
        shown_success = [p.rollout for p in chosen if p.shown_success]
        shown_failure = [p.rollout for p in chosen if not p.shown_success]
        assert all(SUCCESS[j] and j not in GROUPS[i // 4] for j in shown_success)
        assert len(shown_success) == min(2, sum(SUCCESS[j] for g in GROUPS if i not in g for j in g))
        assert len(shown_failure) == 1 and all(not SUCCESS[j] and j not in GROUPS[i // 4] for j in shown_failure)
    assert len({p.rollout for p in peers[8] if p.shown_success} & {0, 4, 5}) == 2  # group 2 sees other prompts' wins


def test_swapped_labels_show_failures_as_successes():
    config = PeerConfig(n_success=2, n_failure=1, context="swapped_labels")
    for i, chosen in enumerate(choose_peers(GROUPS, SUCCESS, config, ["a", "b", "c"])):
        assert all(p.shown_success != SUCCESS[p.rollout] for p in chosen)
        assert all(p.rollout in GROUPS[i // 4] and p.rollout != i for p in chosen)
    group_two = choose_peers(GROUPS, SUCCESS, config, ["a", "b", "c"])[8]  # no success at all: 2 "successes" shown
    assert sum(p.shown_success for p in group_two) == 2 and sum(not p.shown_success for p in group_two) == 0


def test_success_only_matched_fills_failure_slots_with_successes():
    success = [True] * 5 + [False] * 3
    config = PeerConfig(n_success=2, n_failure=1, context="success_only_matched")
    for i, (successes, failures) in enumerate(pick(success, config)):
        assert failures == [] and len(successes) == 3 and i not in successes
        assert all(success[j] for j in successes)


@pytest.mark.parametrize("context", ["random_peer", "swapped_labels", "success_only_matched", "unrelated_prompt"])
def test_a_length_matched_control_fills_each_slot_with_the_closest_length(context):
    """``control_match: token``: slot by slot as the 2S1F context drawn from the same seed, the control's candidate
    closest in length to the peer 2S1F shows there, from a source with the slot's label; random_peer's labels are
    shuffled over the peers it took."""
    success = [True, True, True, False, False, False, True, True, False]
    lengths = [10, 50, 90, 12, 48, 95, 30, 52, 88]
    groups = [[0, 1, 2, 3, 4, 5], [6, 7, 8]]  # enough candidates that no slot goes empty
    real_config = PeerConfig(n_success=2, n_failure=1)
    matched_config = PeerConfig(n_success=2, n_failure=1, context=context, control_match="token")
    for seed in range(30):
        keys = [f"s{seed}", f"t{seed}"]
        real = choose_peers(groups, success, real_config, keys, lengths)
        control = choose_peers(groups, success, matched_config, keys, lengths)
        for i in groups[0]:
            assert i not in [p.rollout for p in control[i]]
            assert len(control[i]) <= len(real[i]) and (len(control[i]) == len(real[i]) or context not in (
                "random_peer", "unrelated_prompt"))  # those never run out of candidates here
            for k, (shown, slot) in enumerate(zip(control[i], real[i])):
                if context == "random_peer":
                    pool = [j for j in groups[0] if j != i]
                elif context == "swapped_labels":
                    pool = [j for j in groups[0] if j != i and success[j] != slot.shown_success]
                elif context == "success_only_matched":
                    pool = [j for j in groups[0] if j != i and success[j]]
                else:
                    pool = [j for j in groups[1] if success[j] == slot.shown_success]
                taken = [p.rollout for p in control[i][:k]]
                closest = min(abs(lengths[j] - lengths[slot.rollout]) for j in pool if j not in taken)
                assert abs(lengths[shown.rollout] - lengths[slot.rollout]) == closest, (seed, i)
                if context != "random_peer":
                    assert shown.shown_success == (slot.shown_success or context == "success_only_matched")
            if context == "random_peer":  # the method's own peers, under the slots' labels in random order
                assert [p.rollout for p in control[i]] == [p.rollout for p in real[i]]
                assert sorted(p.shown_success for p in control[i]) == sorted(p.shown_success for p in real[i])


def test_a_length_matched_swapped_control_covers_a_lone_success():
    """A lone success's 2S1F context shows failures only; swapped_labels has no success to show as a failure there,
    so it shows those failures as successes rather than nothing (as block mode does)."""
    success, lengths = [True, False, False, False], [5, 9, 7, 6]
    config = PeerConfig(n_success=2, n_failure=1, context="swapped_labels", control_match="token")
    for seed in range(20):
        lone = choose_peers([[0, 1, 2, 3]], success, config, [f"s{seed}"], lengths)[0]
        assert len(lone) == 1 and lone[0].shown_success and not success[lone[0].rollout]


def test_length_matching_moves_a_random_control_towards_the_real_contexts_length():
    success = [True, True, False, False, False, False, False, False]
    lengths = [20, 22, 200, 210, 190, 21, 23, 205]
    groups = [list(range(8))]

    def mean_length(config):
        total = shown = 0
        for seed in range(50):
            for chosen in choose_peers(groups, success, config, [f"s{seed}"], lengths):
                total += sum(lengths[p.rollout] for p in chosen)
                shown += 1
        return total / shown

    real = mean_length(PeerConfig(n_success=2, n_failure=1))
    block = mean_length(PeerConfig(n_success=2, n_failure=1, context="random_peer"))
    token = mean_length(PeerConfig(n_success=2, n_failure=1, context="random_peer", control_match="token"))
    assert abs(token - real) < 0.2 * abs(block - real)


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


def rollouts_of(tokenizer, responses, rewards, feedback=None, groups=None):
    rollouts = Rollouts(groups or [0] * len(responses), [tokenizer.encode("prompt")] * len(responses), responses,
                        [tokenizer.decode(r) for r in responses], [True] * len(responses))
    rollouts.record_scores([Score(r, f) for r, f in zip(rewards, feedback or [None] * len(rewards))], 0.5)
    return rollouts


def test_truncation_never_cuts_question_or_closing(tokenizer):
    example = Example("q1", [{"role": "system", "content": "SYS"}, {"role": "user", "content": "QUESTION?"}], "A", "sci")
    long = tokenizer.encode("def add(a, b): return a + b " * 50)
    rollouts = rollouts_of(tokenizer, [long + [tokenizer.eos_token_id], long, tokenizer.encode("short")],
                           [1.0, 1.0, 0.0], [None, None, "wrong"])
    contexts = build_teacher_contexts([example], rollouts, tokenizer, PeerConfig(n_success=1, n_failure=1,
                                                                                 max_peer_tokens=16), "k")
    closing = "Now solve the original question above correctly"
    for context in contexts:
        text = tokenizer.decode(context.prompt_ids)
        assert text.startswith("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQUESTION?")
        assert closing in text and text.endswith("<|im_start|>assistant\n")
        assert "Feedback" not in text  # feedback is off by default
    assert contexts[2].truncated_peers == 1 and "tokens omitted" in tokenizer.decode(contexts[2].prompt_ids)


def test_feedback_only_when_enabled(tokenizer):
    example = Example("q", [{"role": "user", "content": "Q"}], "A", "sci")
    rollouts = rollouts_of(tokenizer, [tokenizer.encode("a"), tokenizer.encode("b")], [0.0, 0.0],
                           ["bad format", "bad format"])
    contexts = build_teacher_contexts([example], rollouts, tokenizer,
                                      PeerConfig(n_success=0, n_failure=1, include_feedback=True), "k")
    assert "Feedback on that attempt: bad format" in tokenizer.decode(contexts[0].prompt_ids)


CLOSING = "Now solve the original question above correctly, in your own words, and follow its answer format."


def chat(tokenizer, content):
    return list(tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def test_own_feedback_joins_the_context_token_for_token(tokenizer):
    """``self_feedback``: the rollout's own verifier feedback after its peers (always, or only when no success is
    shown), or alone with the question when it has no peers; a rollout without feedback keeps its usual context."""
    example = Example("q", [{"role": "user", "content": "Q"}], "A", "sci")
    rollouts = rollouts_of(tokenizer, [tokenizer.encode(t) for t in ("right", "wrong one", "wrong two")],
                           [1.0, 0.0, 0.0], [None, "The answer B is incorrect.", "No final answer found."])
    peers = ("Q\n\n---\nOther attempts at this question, for reference:\n\n"
             "Here is a correct solution from another attempt:\nright\n\n"
             "Here is an incorrect solution from another attempt:\nwrong two\n\n---\n")
    own = "The verifier's feedback on your own earlier attempt:\nThe answer B is incorrect.\n\n"
    always = build_teacher_contexts([example], rollouts, tokenizer,
                                    PeerConfig(n_success=1, n_failure=1, self_feedback="always"), "k")
    assert always[1].prompt_ids == chat(tokenizer, peers + own + CLOSING)
    assert "feedback" not in tokenizer.decode(always[0].prompt_ids)  # the success has no feedback
    shown_success = build_teacher_contexts([example], rollouts, tokenizer,
                                           PeerConfig(n_success=1, n_failure=1, self_feedback="without_success"), "k")
    assert shown_success[1].prompt_ids == chat(tokenizer, peers + CLOSING)  # a success is shown: no feedback
    failures_only = build_teacher_contexts([example], rollouts, tokenizer,
                                           PeerConfig(n_success=0, n_failure=1, self_feedback="without_success"), "k")
    assert own in tokenizer.decode(failures_only[1].prompt_ids)
    alone = build_teacher_contexts([example], rollouts, tokenizer, PeerConfig(context="none", self_feedback="always"),
                                   "k")
    assert alone[1].prompt_ids == chat(tokenizer, "Q\n\n---\n" + own + CLOSING) and alone[1].active
    assert alone[0].prompt_ids == rollouts.prompt_ids[0] and alone[0].active  # no feedback: the plain prompt
    gated = build_teacher_contexts([example], rollouts, tokenizer,
                                   PeerConfig(n_success=0, n_failure=1, require_success=True, self_feedback="always"),
                                   "k")
    assert not gated[1].active and not gated[1].prompt_ids  # require_success: no success shown, not even feedback
    assert not gated[0].active  # no success peer and no feedback: no signal


def test_summary_is_the_first_tagged_span_or_the_start_of_the_response():
    from mopd_lightning.peers import summary_of

    config = PeerConfig(summaries="all", summary_fallback_chars=10)
    assert summary_of("B.\n<summary>\n used units </summary> <summary>two</summary>", config) == ("used units", False)
    assert summary_of("no summary in this response", config) == ("no summary", True)
    assert summary_of("<summary> </summary> empty", config) == ("<summary> ", True)  # an empty one is none
    assert summary_of("<Summary>x</Summary>", config)[1]  # the tag is case-sensitive, as the reference's


def test_the_summary_request_ends_the_last_user_turn():
    from mopd_lightning.peers import with_summary_request

    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert with_summary_request(messages, PeerConfig()) == messages
    asked = with_summary_request(messages, PeerConfig(summaries="all", summary_tag="gist"))
    assert asked[0] == messages[0] and asked[1]["content"] == (
        "Q\n\nAfter your answer, sum up your approach in one sentence between <gist> and </gist>.")


def test_summaries_join_the_context_token_for_token(tokenizer):
    """The reference's shipped default: one success shown whole, then the summaries of up to k other rollouts of
    the group (all outcomes, each labelled by its own), never the rollout itself nor the one shown whole; the
    question carries the request for a summary; a rollout without a summary is shown by the start of its response."""
    example = Example("q", [{"role": "user", "content": "Q"}], "A", "sci")
    texts = ["A <summary>used units</summary>", "B <summary>guessed</summary>", "C without one",
             "D <summary>read it wrong</summary>"]
    rollouts = rollouts_of(tokenizer, [tokenizer.encode(t) for t in texts], [1.0, 1.0, 0.0, 0.0])
    config = PeerConfig(n_success=1, n_failure=0, summaries="all", summary_k=7)
    contexts = build_teacher_contexts([example], rollouts, tokenizer, config, "k")
    question = "Q\n\nAfter your answer, sum up your approach in one sentence between <summary> and </summary>."
    for r, context in enumerate(contexts):
        (whole,) = context.peers
        assert whole.shown_success and whole.rollout != r
        assert sorted(p.rollout for p in context.summarized) == sorted({0, 1, 2, 3} - {r, whole.rollout})
        summaries = "".join(
            f"Summary of another {'correct' if rollouts.success[p.rollout] else 'incorrect'} attempt: "
            f"{ {0: 'used units', 1: 'guessed', 2: 'C without one', 3: 'read it wrong'}[p.rollout]}\n\n"
            for p in context.summarized)
        content = (f"{question}\n\n---\nOther attempts at this question, for reference:\n\n"
                   f"Here is a correct solution from another attempt:\n{texts[whole.rollout]}\n\n{summaries}---\n"
                   + CLOSING)
        assert context.prompt_ids == chat(tokenizer, content), r
        assert context.summary_fallbacks == (2 in [p.rollout for p in context.summarized])
    successes_only = build_teacher_contexts([example], rollouts, tokenizer,
                                            PeerConfig(n_success=1, n_failure=0, summaries="success", summary_k=3),
                                            "k")
    assert all(rollouts.success[p.rollout] for c in successes_only for p in c.summarized)
    assert [len(c.summarized) for c in successes_only] == [0, 0, 1, 1]  # the one other success is shown whole


def test_summaries_are_refused_in_a_control_and_need_their_field():
    with pytest.raises(ValueError, match="model.peers.summaries"):
        PeerConfig(context="random_peer", summaries="all", summary_k=2)
    PeerConfig(context="random_peer", summaries="all", summary_k=0)  # asked for, shown nowhere: the analysis's case
    with pytest.raises(ValueError, match="model.peers.summary_success_template"):
        PeerConfig(summaries="all", summary_success_template="no field")


def test_context_none_is_the_plain_prompt_and_unrelated_shows_another_answer(tokenizer):
    batch = [Example(q, [{"role": "user", "content": q}], "A", "sci") for q in ("Q0", "Q1")]
    rollouts = rollouts_of(tokenizer, [tokenizer.encode(t) for t in ("alpha", "beta", "gamma", "delta")],
                           [0.0, 0.0, 1.0, 0.0], groups=[0, 0, 1, 1])
    plain = build_teacher_contexts(batch, rollouts, tokenizer, PeerConfig(context="none"), "k")
    assert all(c.active and c.prompt_ids == p for c, p in zip(plain, rollouts.prompt_ids))
    unrelated = build_teacher_contexts(batch, rollouts, tokenizer,
                                       PeerConfig(n_success=1, n_failure=0, context="unrelated_prompt"), "k")
    text = tokenizer.decode(unrelated[0].prompt_ids)
    assert "gamma" in text and "Q0" in text and "correct solution" in text  # prompt 1's success, shown to prompt 0
    assert not unrelated[2].active  # the only success has no success of another prompt to see


@pytest.mark.parametrize("field,kwargs", [
    ("model.peers", {"n_success": 0, "n_failure": 0}),
    ("model.peers.failure_when", {"failure_when": "sometimes"}),
    ("model.peers.context_template", {"context_template": "no fields"}),
    ("model.peers.context", {"context": "imaginary_friend"}),
    ("model.peers.self_feedback", {"self_feedback": "sometimes"}),
    ("model.peers.context_template", {"self_feedback": "always", "context_template": "{question} {peers}"}),
])
def test_bad_peer_config_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        PeerConfig(**kwargs)


def contexts_of(tokenizer, success, config, feedback=None):
    """The teacher contexts of one group whose rollouts succeed as ``success``."""
    example = Example("q", [{"role": "user", "content": "Q"}], "A", "sci")
    rollouts = rollouts_of(tokenizer, [tokenizer.encode(f"answer {k}") for k in range(len(success))],
                           [float(s) for s in success], feedback)
    return build_teacher_contexts([example], rollouts, tokenizer, config, "k")


def whole(contexts):
    return [([p.rollout for p in c.peers if p.shown_success], [p.rollout for p in c.peers if not p.shown_success])
            for c in contexts]


def test_require_success_masks_failure_only_contexts(tokenizer):
    config = PeerConfig(n_success=2, n_failure=1, require_success=True)
    contexts = contexts_of(tokenizer, [True, False, False, False], config)
    assert whole(contexts)[0] == ([], []) and not contexts[0].active  # only failures to show: no context
    assert all(s == [0] and len(f) == 1 for s, f in whole(contexts)[1:])
    gated = contexts_of(tokenizer, [False] * 4, PeerConfig(n_success=0, n_failure=1, require_success=True))
    assert not any(c.active for c in gated)


@pytest.mark.parametrize("summaries", ["all", "failure"])
@pytest.mark.parametrize("self_feedback", ["never", "always", "without_success"])
def test_require_success_holds_for_summaries_and_own_feedback(tokenizer, summaries, self_feedback):
    """No success shown, whole or by its summary: no context at all, never one of failure summaries or of the
    rollout's own feedback alone."""
    config = PeerConfig(n_success=1, n_failure=1, require_success=True, summaries=summaries, summary_k=2,
                        self_feedback=self_feedback)
    failed = contexts_of(tokenizer, [False] * 4, config, ["The answer B is incorrect."] * 4)
    assert not any(c.active or c.summarized or c.peers for c in failed)
    mixed = contexts_of(tokenizer, [True, False, False, False], config, [None] + ["The answer B is incorrect."] * 3)
    assert not mixed[0].active  # the lone success: failures only, whole and summarised
    assert all(c.active and any(p.shown_success for p in c.peers + c.summarized) for c in mixed[1:])


# -- the reference's peer options ---------------------------------------------------------------------------------
def test_a_success_is_its_own_demonstration_only_when_reprompting_on_self_success(tokenizer):
    success = [True, False, False, False]
    config = PeerConfig(n_success=1, n_failure=1, require_success=True)
    assert whole(contexts_of(tokenizer, success, config))[0] == ([], [])  # the lone success has no success to be shown
    reprompted = whole(contexts_of(tokenizer, success, PeerConfig(n_success=1, n_failure=1, require_success=True,
                                                           dont_reprompt_on_self_success=False)))
    assert reprompted[0][0] == [0] and len(reprompted[0][1]) == 1  # its own answer, as the reference allows
    assert all(s == [0] for s, _ in reprompted[1:])  # failures are never shown themselves
    config = PeerConfig(n_success=1, n_failure=0, dont_reprompt_on_self_success=False)
    shown = {tuple(pick([True, True, False], config, f"k{i}")[0][0]) for i in range(40)}
    assert shown == {(0,), (1,)}  # itself or the other success, drawn at random


def test_lone_successes_and_successes_without_signal_are_counted(tokenizer):
    from mopd_lightning.metrics import success_coverage

    example = Example("q", [{"role": "user", "content": "Q"}], "A", "sci")
    rollouts = rollouts_of(tokenizer, [tokenizer.encode(t) for t in "abcdef"], [1.0, 0.0, 0.0, 1.0, 1.0, 0.0],
                           groups=[0, 0, 0, 1, 1, 1])
    contexts = build_teacher_contexts([example, example], rollouts, tokenizer,
                                      PeerConfig(n_success=1, n_failure=1, require_success=True), "k")
    assert [c.active for c in contexts] == [False, True, True, True, True, True]
    coverage = success_coverage(rollouts, contexts)
    assert coverage == {"train/lone_success_fraction": 1 / 6, "train/success_without_signal_fraction": 1 / 3}


@pytest.mark.parametrize("text,expected", [
    ("<think>let me see\nmaybe 4</think>\n\nThe answer is 4.", "The answer is 4."),
    ("A <think>x</think> B <think>y</think>C", "A B C"),
    ("<think>never closed. The answer is 4.", "<think>never closed. The answer is 4."),
    ("</think>The answer is 4.", "</think>The answer is 4."),
])
def test_remove_thinking_as_the_reference_does(text, expected):
    from mopd_lightning.peers import remove_thinking

    assert remove_thinking(text) == expected


def test_thinking_is_removed_from_success_peers_only(tokenizer):
    example = Example("q", [{"role": "user", "content": "Q"}], "A", "sci")
    answers = ["<think>SECRET-S</think> right", "<think>SECRET-F</think> wrong", "other"]
    rollouts = rollouts_of(tokenizer, [tokenizer.encode(t) for t in answers], [1.0, 0.0, 0.0])
    for remove in (False, True):
        config = PeerConfig(n_success=1, n_failure=1, remove_thinking_from_demonstration=remove)
        text = tokenizer.decode(build_teacher_contexts([example], rollouts, tokenizer, config, "k")[2].prompt_ids)
        assert "right" in text and "wrong" in text and "SECRET-F" in text
        assert ("SECRET-S" in text) != remove


@pytest.mark.parametrize("method", ["mopd", "opd"])
@pytest.mark.parametrize("summaries", ["off", "all"])
@pytest.mark.parametrize("self_feedback", ["never", "without_success"])
def test_summaries_and_own_feedback_train_with_each_method(tiny_model, monkeypatch, method, summaries,
                                                           self_feedback):
    """The reference's contexts where they meet the methods (opd's preset peers: one success, no failure) in a real
    step: summaries are shown (the random model writes none: each stood in for by its response's start), and a
    failure's own feedback reaches a context that shows no success."""
    from mopd_lightning.rewards import VERIFIERS
    from test_step import make, run

    monkeypatch.setitem(VERIFIERS, "parity", lambda strict, sandbox: lambda response, truth: Score(
        float(len(response) % 2 == 0), None if len(response) % 2 == 0 else "Odd length."))
    module = make(tiny_model, method=method, peers=PeerConfig(summaries=summaries, summary_k=2,
                                                              self_feedback=self_feedback))
    metrics = run(module, steps=1).callback_metrics
    if summaries == "all":
        assert float(metrics["train/summaries_per_context"]) > 0
        assert float(metrics["train/summary_fallback_fraction"]) == 1.0
    else:
        assert float(metrics["train/summaries_per_context"]) == 0
    assert float(metrics["train/grad_norm"]) > 0


@pytest.mark.parametrize("context,n_success,n_failure", [("peers", 2, 1), ("peers", 1, 0), ("swapped_labels", 1, 1),
                                                         ("random_peer", 2, 1)])
@pytest.mark.parametrize("summaries", ["off", "all"])
@pytest.mark.parametrize("self_feedback", ["never", "without_success"])
def test_swapped_labels_contexts_differ_from_the_true_ones_only_in_the_labels_words(tokenizer, context, n_success,
                                                                                   n_failure, summaries,
                                                                                   self_feedback):
    """The wrong hint of ``label_contrast``: every rollout's swapped context is, token for token, its true context
    written with the success and failure wordings exchanged (same peers, same texts in the same places, the same
    summaries and own feedback), so that the contrast between the two sees only what the labels say."""
    example = Example("q", [{"role": "user", "content": "Q"}], "A", "sci")
    texts = ["<think>S1</think> right <summary>units</summary>", "right again", "wrong", "<think>F</think> wrong too",
             "no idea"]
    rollouts = rollouts_of(tokenizer, [tokenizer.encode(t) for t in texts], [1.0, 1.0, 0.0, 0.0, 0.0],
                           feedback=[None, None, "off by one", None, "no answer"])
    summarized = dict(summaries=summaries, summary_k=2) if context == "peers" else {}
    config = PeerConfig(context=context, n_success=n_success, n_failure=n_failure, self_feedback=self_feedback,
                        remove_thinking_from_demonstration=True, require_success=False, **summarized)
    exchanged = replace(config, success_template=config.failure_template, failure_template=config.success_template,
                        summary_success_template=config.summary_failure_template,
                        summary_failure_template=config.summary_success_template)
    true = build_teacher_contexts([example], rollouts, tokenizer, config, "k")
    swapped = build_teacher_contexts([example], rollouts, tokenizer, config, "k", swap_labels=True)
    reworded = build_teacher_contexts([example], rollouts, tokenizer, exchanged, "k")
    assert any(c.peers for c in true)
    for r, (t, s, w) in enumerate(zip(true, swapped, reworded)):
        assert s.prompt_ids == w.prompt_ids, r
        assert s.active == t.active and [p.rollout for p in s.peers] == [p.rollout for p in t.peers]
        assert [p.shown_success for p in s.peers] == [not p.shown_success for p in t.peers]
        assert [p.shown_success for p in s.summarized] == [not p.shown_success for p in t.summarized]
        if t.peers:
            assert s.prompt_ids != t.prompt_ids
