"""The peer-context controls, tested by the properties that make them controls, over many random groups (sizes 2-8,
every success count, lengths with and without ties, both ``control_match`` modes, ``dont_reprompt_on_self_success``
both ways; summaries and feedback on and off where the whole teacher prompt is built).

- a label-blind control's shown labels agree with the verifier's only as often as chance gives: given the peers a
  context shows and the labels it shows, which peer carries which label is a uniformly random assignment;
- ``swapped_labels`` shows only wrong labels, ``unrelated_prompt`` never its own group, and only true labels;
- no context holds the rollout itself (but the method's success slots, where reprompting on a success is allowed),
  its summary, or its own feedback (but under ``self_feedback``);
- a control gives a context to every rollout the method's context reaches, unless it has nothing to show there.
"""

import math
import random

import pytest
from transformers import AutoTokenizer

from mopd_lightning.analysis import CONTEXT_VARIANTS, variant_peers
from mopd_lightning.config import LABEL_BLIND, PeerConfig
from mopd_lightning.data.example import Example
from mopd_lightning.peers import Peer, build_teacher_contexts, choose_peers
from mopd_lightning.rewards import Score
from mopd_lightning.rollouts import Rollouts

CONTROLS = ("random_peer", "unrelated_prompt", "swapped_labels", "success_only_matched")


def random_batch(rng: random.Random, ties: bool):
    """1-3 prompts of 2-8 rollouts each, any number of successes; lengths from a narrow range (ties) or distinct."""
    sizes = [rng.randint(2, 8) for _ in range(rng.randint(1, 3))]
    groups, start = [], 0
    for size in sizes:
        groups.append(list(range(start, start + size)))
        start += size
    success = [False] * start
    for members in groups:
        for r in rng.sample(members, rng.randint(0, len(members))):
            success[r] = True
    lengths = [rng.randint(1, 3) for _ in range(start)] if ties else rng.sample(range(1, 10 * start), start)
    return groups, success, lengths


def cases(n: int = 300):
    """(groups, success, lengths, config, seed keys) over every control, mode and reprompt setting."""
    rng = random.Random(0)
    for k in range(n):
        groups, success, lengths = random_batch(rng, ties=k % 2 == 0)
        for context in CONTROLS:
            for match in ("block", "token"):
                config = PeerConfig(n_success=2, n_failure=1, context=context, control_match=match,
                                    dont_reprompt_on_self_success=k % 3 != 0)
                yield groups, success, lengths, config, [f"{k}:{g}" for g in range(len(groups))]


def label_agreement(contexts, success):
    """(z, contexts counted): the labels' agreement with the verifier against what a uniformly random assignment
    of each context's labels to its peers gives: a hypergeometric count of the "correct" labels that fall on true
    successes, summed over contexts, as a z-score."""
    observed = expected = variance = 0.0
    counted = 0
    for peers in contexts:
        k = len(peers)
        s = sum(p.shown_success for p in peers)  # "correct" labels shown
        t = sum(success[p.rollout] for p in peers)  # true successes among the peers
        if k < 2 or s in (0, k) or t in (0, k):  # a fixed labelling: nothing to assign at random
            continue
        counted += 1
        observed += sum(p.shown_success and success[p.rollout] for p in peers)
        expected += s * t / k
        variance += s * (t / k) * ((k - t) / k) * ((k - s) / (k - 1))
    return (observed - expected) / math.sqrt(variance), counted


@pytest.mark.parametrize("match", ["block", "token"])
def test_random_peer_labels_agree_with_the_verifier_only_by_chance(match):
    contexts, success_of = [], []
    rng = random.Random(1)
    for k in range(600):
        groups, success, lengths = random_batch(rng, ties=k % 2 == 0)
        config = PeerConfig(n_success=2, n_failure=1, context="random_peer", control_match=match)
        chosen = choose_peers(groups, success, config, [f"{k}:{g}" for g in range(len(groups))], lengths)
        contexts += [[Peer(p.rollout + len(success_of), p.shown_success) for p in peers] for peers in chosen]
        success_of += success
    z, counted = label_agreement(contexts, success_of)
    assert counted > 500 and abs(z) < 4, z


def test_the_label_agreement_statistic_sees_labels_that_follow_the_verifier():
    """The positive control of the statistic above: the method's own labels (the verifier's), or random_peer
    labelled by slot over the method's own peers (the defect of token-matched random_peer), are far from chance."""
    rng = random.Random(2)
    truthful, slotted, success_of = [], [], []
    for k in range(600):
        groups, success, lengths = random_batch(rng, ties=False)
        keys = [f"{k}:{g}" for g in range(len(groups))]
        method = choose_peers(groups, success, PeerConfig(n_success=2, n_failure=1), keys, lengths)
        offset = len(success_of)
        truthful += [[Peer(p.rollout + offset, p.shown_success) for p in peers] for peers in method]
        slotted += [[Peer(p.rollout + offset, k < 2) for k, p in enumerate(peers)] for peers in method]
        success_of += success
    assert label_agreement(truthful, success_of)[0] > 10
    assert label_agreement(slotted, success_of)[0] > 10


def test_controls_keep_their_promises_on_random_groups():
    for groups, success, lengths, config, keys in cases():
        chosen = choose_peers(groups, success, config, keys, lengths)
        method = choose_peers(groups, success, PeerConfig(n_success=2, n_failure=1, context="peers",
                                                          dont_reprompt_on_self_success=config.dont_reprompt_on_self_success),
                              keys, lengths)
        group_of = {r: g for g, members in enumerate(groups) for r in members}
        for i, peers in enumerate(chosen):
            where = (config.context, config.control_match, i)
            shown = [p.rollout for p in peers]
            assert len(set(shown)) == len(shown), where
            own_allowed = config.context == "success_only_matched" and success[i] and \
                not config.dont_reprompt_on_self_success
            assert i not in shown or own_allowed, where
            if config.context == "swapped_labels":
                assert all(p.shown_success != success[p.rollout] for p in peers), where
            if config.context == "unrelated_prompt":
                assert all(group_of[p.rollout] != group_of[i] for p in peers), where
                assert all(p.shown_success == success[p.rollout] for p in peers), where
            if config.context == "success_only_matched":
                assert all(p.shown_success and success[p.rollout] for p in peers), where
            if config.context in ("random_peer", "swapped_labels"):
                assert all(group_of[p.rollout] == group_of[i] for p in peers), where
            if config.control_match == "token":
                assert len(peers) <= len(method[i]), where
                if config.context == "random_peer":  # as many as the method shows, while the group has others
                    assert len(peers) == min(len(method[i]), len(groups[group_of[i]]) - 1), where
            # coverage: a context wherever the method has one, unless the control has nothing to show
            if method[i] and not peers:
                assert config.context in ("unrelated_prompt", "success_only_matched"), where
                if config.context == "unrelated_prompt":
                    assert len(groups) == 1, where
                else:
                    assert not any(success[j] for j in groups[group_of[i]] if j != i), where


def test_the_analysis_variants_never_show_a_rollout_itself_on_random_groups():
    rng = random.Random(3)
    for k in range(150):
        groups, success, lengths = random_batch(rng, ties=k % 2 == 0)
        base = PeerConfig(dont_reprompt_on_self_success=k % 2 == 0, control_match=("block", "token")[k % 3 == 0])
        for name in CONTEXT_VARIANTS:
            if name == "1S+summaries":
                continue  # needs a run that asks for summaries: below, with the whole prompt
            chosen = choose_peers(groups, success, variant_peers(base, name), [f"{k}:{g}" for g in range(len(groups))],
                                  lengths)
            assert all(i not in [p.rollout for p in peers] for i, peers in enumerate(chosen)), (name, k)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def tagged_rollouts(tokenizer, groups, success):
    """Rollouts whose response, summary and feedback each name their rollout, so a prompt shows whose they are."""
    n = sum(map(len, groups))
    texts = [f"answer {r}. <summary>summary {r}</summary>" for r in range(n)]
    group = [g for g, members in enumerate(groups) for _ in members]
    rollouts = Rollouts(group, [tokenizer.encode("prompt")] * n, [tokenizer.encode(t) for t in texts], texts,
                        [True] * n)
    rollouts.record_scores([Score(float(ok), None if ok else f"feedback {r}.") for r, ok in enumerate(success)], 0.5)
    return rollouts


def test_no_teacher_prompt_holds_the_rollout_itself_its_summary_or_its_feedback(tokenizer):
    """Whole prompts over random groups with summaries, peers' feedback and the rollout's own feedback on and off:
    the rollout's own text, summary and feedback reach its teacher only where a setting asks for exactly that."""
    rng = random.Random(4)
    for k in range(40):
        groups, success, _ = random_batch(rng, ties=False)
        rollouts = tagged_rollouts(tokenizer, groups, success)
        batch = [Example(f"q{g}", [{"role": "user", "content": f"Q{g}"}], "A", "sci") for g in range(len(groups))]
        reprompt = k % 2 == 0
        for context in ("peers",) + CONTROLS:
            for summaries in (("off", "all") if context == "peers" else ("off",)):
                for self_feedback in ("never", "always", "without_success"):
                    config = PeerConfig(context=context, control_match=("block", "token")[k % 3 == 0],
                                        summaries=summaries, summary_k=3, self_feedback=self_feedback,
                                        include_feedback=context not in LABEL_BLIND,
                                        dont_reprompt_on_self_success=not reprompt)
                    contexts = build_teacher_contexts(batch, rollouts, tokenizer, config, f"s{k}")
                    for r, c in enumerate(contexts):
                        text = tokenizer.decode(c.prompt_ids)
                        where = (k, context, summaries, self_feedback, r)
                        assert r not in [p.rollout for p in c.summarized], where
                        if f"answer {r}." in text:  # shown whole: only as its own success peer, when allowed
                            assert reprompt and success[r] and context in ("peers", "success_only_matched"), where
                        if f"feedback {r}." in text:  # its own feedback: only when the setting shows it
                            assert self_feedback != "never" and "verifier's feedback on your own" in text, where


def test_label_blind_contexts_never_state_a_peers_outcome(tokenizer):
    """The analysis keeps the run's peer feedback for the method's contexts and drops it from the label-blind
    controls (where training refuses it): a failure shown as correct is never followed by "... is incorrect"."""
    with pytest.raises(ValueError, match="model.peers.include_feedback"):
        PeerConfig(context="random_peer", include_feedback=True)
    rng = random.Random(5)
    base = PeerConfig(include_feedback=True)
    for k in range(30):
        groups, success, _ = random_batch(rng, ties=False)
        rollouts = tagged_rollouts(tokenizer, groups, success)
        batch = [Example(f"q{g}", [{"role": "user", "content": f"Q{g}"}], "A", "sci") for g in range(len(groups))]
        for name in ("2S1F",) + LABEL_BLIND:
            for c in build_teacher_contexts(batch, rollouts, tokenizer, variant_peers(base, name), f"s{k}"):
                text = tokenizer.decode(c.prompt_ids)
                assert ("Feedback on that attempt" in text) == (name == "2S1F" and any(
                    not success[p.rollout] for p in c.peers)), (k, name)
