"""The teacher-signal analysis: its statistics against direct computations, and its records on a tiny model."""

import dataclasses
import itertools
import json
import random

import pytest
import torch
from test_step import examples, make

from mopd_lightning.analysis import (CONTEXT_VARIANTS, DEFAULT_VARIANTS, OWN_LABEL, auc, bootstrap_mean, brier,
                                     brier_sigmoid, kendall_gamma, pairwise_accuracy, point_biserial, spearman,
                                     summarize, teacher_signal_records, top1_hit, variant_peers, markdown_report)
from mopd_lightning.config import PeerConfig
from mopd_lightning.rewards import Score


def test_auc_and_pairwise_accuracy_by_hand():
    # pairs: 3>1, 3>2, 2>1 win; 2=2 is a tie: one half for both
    assert auc([3, 2], [1, 2]) == 3.5 / 4
    assert pairwise_accuracy([3, 2, 1, 2], [1, 1, 0, 0]) == 3.5 / 4
    assert auc([0.0], [1.0]) == 0.0 and auc([1.0], [1.0]) == 0.5
    # every score tied (the plain context at step 0): no signal, 0.5 like the AUC, not 0
    assert pairwise_accuracy([-1.0] * 4, [1, 0, 0, 1]) == 0.5
    # graded rewards: pairs of two partial answers count too; equal rewards are not a pair
    assert pairwise_accuracy([0.3, 0.2, 0.1], [1.0, 0.5, 0.5]) == 1.0
    assert pairwise_accuracy([0.1, 0.2, 0.3], [0.0, 0.5, 1.0]) == 1.0 and pairwise_accuracy([1, 2], [1, 1]) is None


def _sign(v):
    return (v > 0) - (v < 0)


@pytest.mark.parametrize("seed", range(5))
def test_the_reference_metrics_against_direct_formulas(seed):
    rng = random.Random(seed)
    scores = [round(rng.gauss(0, 1), 1) for _ in range(8)] + [0.5, 0.5]  # some ties
    rewards = [rng.choice([0.0, 0.5, 1.0]) for _ in range(8)] + [1.0, 0.0]
    success = [r >= 0.5 for r in rewards]
    pairs = list(itertools.combinations(range(10), 2))
    untied = [(i, j) for i, j in pairs if scores[i] != scores[j] and rewards[i] != rewards[j]]
    c = sum(_sign(scores[i] - scores[j]) == _sign(rewards[i] - rewards[j]) for i, j in untied)
    assert kendall_gamma(scores, rewards) == pytest.approx((c - (len(untied) - c)) / len(untied))
    y = torch.tensor(success, dtype=torch.float64)
    x = torch.tensor(scores, dtype=torch.float64)
    assert point_biserial(scores, success) == pytest.approx(float(torch.corrcoef(torch.stack([x, y]))[0, 1]))
    p = (x - x.min()) / (x.max() - x.min())
    assert brier(scores, success) == pytest.approx(float(((p - y) ** 2).mean()))
    best = [s for v, s in zip(scores, success) if v == max(scores)]
    assert top1_hit(scores, success) == sum(best) / len(best)
    logps = -x.abs()  # mean log-probs are at most 0
    assert brier_sigmoid(logps.tolist(), success) == pytest.approx(float(((torch.sigmoid(logps) - y) ** 2).mean()))


def test_the_reference_metrics_on_ties_and_constants():
    assert kendall_gamma([1.0, 1.0, 1.0], [1, 0, 0]) is None  # every pair tied in score
    assert point_biserial([0.2, 0.2], [True, False]) is None
    assert brier([0.2, 0.2, 0.2, 0.2], [True, False, False, False]) == pytest.approx((0.25 + 3 * 0.25) / 4)
    assert top1_hit([0.3, 0.3, 0.1], [True, False, True]) == 0.5  # a tie at the top: half a hit
    assert top1_hit([0.1, 0.3], [False, True]) == 1.0 and top1_hit([0.3, 0.1], [False, True]) == 0.0


def test_spearman_is_the_pearson_correlation_of_ranks():
    rng = random.Random(0)
    x = [rng.random() for _ in range(20)]
    y = [v + rng.random() for v in x]
    rx = torch.tensor(x).argsort().argsort().double()
    ry = torch.tensor(y).argsort().argsort().double()
    assert spearman(x, y) == pytest.approx(float(torch.corrcoef(torch.stack([rx, ry]))[0, 1]))
    # ties take the average rank: ranks of [1, 0, 0, 1] are [3.5, 1.5, 1.5, 3.5]
    ranks_y = torch.tensor([3.5, 1.5, 1.5, 3.5], dtype=torch.float64)
    expected = torch.corrcoef(torch.stack([torch.tensor([4.0, 1, 2, 3], dtype=torch.float64), ranks_y]))[0, 1]
    assert spearman([0.9, 0.1, 0.2, 0.3], [1, 0, 0, 1]) == pytest.approx(float(expected))
    assert spearman([1, 2, 3], [1, 1, 1]) is None


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = [0.1 * i for i in range(30)]
    first = bootstrap_mean(values, samples=500, seed=3)
    assert first == bootstrap_mean(values, samples=500, seed=3)
    assert first["low"] < first["mean"] < first["high"] and first["n"] == 30
    assert bootstrap_mean([], samples=10)["mean"] is None


def record(prompt, success, student, teacher):
    return {"prompt": prompt, "reward": float(success), "success": success, "response_len": 5,
            "student_logp": student, "student_entropy": 1.0,
            "teacher": {"good": {"logp": teacher, "entropy": 1.5}, "bad": {"logp": -teacher, "entropy": 0.5},
                        "partial": None if success else {"logp": 0.0, "entropy": 1.0}}}


def test_summary_separates_an_informative_context_from_a_misleading_one():
    records = [record(f"p{p}", ok, -1.0, -0.5 if ok else -2.0) for p in range(6) for ok in (True, False, False)]
    records += [record("all-wrong", False, -1.0, -1.0)]  # no contrast: counts for the gaps, not for the AUC
    summary = summarize(records, ["good", "bad", "partial"], samples=200)
    good, bad = summary["variants"]["good"], summary["variants"]["bad"]
    assert summary["prompts"] == 7 and summary["mixed_prompts"] == 6
    assert good["auc"]["mean"] == 1.0 and good["auc"]["n"] == 6 and good["pairwise_accuracy"]["mean"] == 1.0
    assert bad["auc"]["mean"] == 0.0 and bad["spearman"]["mean"] == pytest.approx(-1.0)
    assert good["entropy_gap"]["mean"] == pytest.approx(0.5) and bad["entropy_gap"]["mean"] == pytest.approx(-0.5)
    assert good["top1_hit"]["mean"] == 1.0 and bad["top1_hit"]["mean"] == 0.0
    assert good["kendall_gamma"]["mean"] == 1.0 and bad["point_biserial"]["mean"] == pytest.approx(-1.0)
    assert good["brier"]["mean"] == 0.0 and bad["brier"]["mean"] == 1.0
    sigmoid = torch.sigmoid(torch.tensor([-0.5, -2.0, -2.0]))  # the good teacher's mean log-probs, success first
    expected = float(((sigmoid - torch.tensor([1.0, 0.0, 0.0])) ** 2).mean())
    assert good["brier_sigmoid"]["mean"] == pytest.approx(expected)
    # the gap is the score with its sign turned: student minus teacher, prompt by prompt
    assert good["gap"]["mean"] == pytest.approx(-good["score"]["mean"])
    assert summary["variants"]["partial"]["auc"]["n"] == 0  # successes had no context: nothing to compare
    assert good["rollouts_scored"] == 19 and summary["variants"]["partial"]["rollouts_scored"] == 13


def test_the_report_says_what_each_control_left_out_and_where_its_auc_is_defined():
    """A control that reaches fewer rollouts than 2S1F compares a subset: the summary counts them, the markdown
    shows them beside the prompts each AUC is defined on, and how each control picked its peers."""
    records = [record(f"p{p}", ok, -1.0, -0.5 if ok else -2.0) for p in range(3) for ok in (True, False)]
    for r in records:
        r["teacher"]["2S1F"] = r["teacher"]["good"]
        r["teacher"]["unrelated_prompt"] = None if r["prompt"] == "p0" else r["teacher"]["bad"]
    summary = summarize(records, ["2S1F", "unrelated_prompt"], samples=50)
    assert summary["variants"]["unrelated_prompt"]["left_out_of_2S1F"] == 2
    assert summary["variants"]["2S1F"]["left_out_of_2S1F"] == 0
    meta = {"peer_context": {"control_match": "token"}, "variant_peers": {"2S1F": {}, "unrelated_prompt": {
        "context": "unrelated_prompt"}}}
    table = markdown_report(summary, "t", meta)
    assert "| unrelated_prompt | token | 4 | 2 | 2 |" in table and "| 2S1F | - | 6 | 0 | 3 |" in table
    assert "variant_peers" not in table  # recorded in the json, shown as the table


def test_variants_are_the_paper_mixes_and_controls():
    base = PeerConfig(n_success=2, n_failure=1, failure_when="when_no_success", max_peer_tokens=99)
    assert (variant_peers(base, "1S1F").n_success, variant_peers(base, "1S1F").n_failure) == (1, 1)
    assert variant_peers(base, "none").context == "none" and variant_peers(base, "2S").failure_when == "always"
    assert variant_peers(base, "swapped_labels").context == "swapped_labels"
    assert variant_peers(base, "1F").max_peer_tokens == 99
    assert {"none", "1S", "2S", "1F", "1S1F", "2S1F", "random_peer", "unrelated_prompt", "swapped_labels",
            "success_only_matched"} == set(DEFAULT_VARIANTS)
    assert set(CONTEXT_VARIANTS) - set(DEFAULT_VARIANTS) == set(OWN_LABEL) | {"1S+summaries"}  # when asked for
    with pytest.raises(ValueError, match="model.peers.summaries"):
        variant_peers(base, "1S+summaries")  # the run did not ask its student for summaries
    asking = PeerConfig(summaries="all", summary_k=7)
    assert variant_peers(asking, "1S+summaries").summary_k == 7
    assert variant_peers(asking, "random_peer").summary_k == 0  # asked (the prompts), not shown
    trained_with_feedback = PeerConfig(self_feedback="always")
    assert variant_peers(trained_with_feedback, "2S1F").self_feedback == "never"
    assert variant_peers(base, "2S1F_feedback_without_success").self_feedback == "without_success"
    assert (variant_peers(base, "self_feedback").context, variant_peers(base, "self_feedback").self_feedback) == (
        "none", "always")
    with pytest.raises(ValueError, match="3S"):
        variant_peers(base, "3S")
    for match in ("block", "token"):  # the run's model.peers.control_match decides how the controls pick
        assert variant_peers(PeerConfig(control_match=match), "random_peer").control_match == match
    with_feedback = PeerConfig(include_feedback=True)  # kept where the labels are the verifier's, dropped elsewhere
    assert variant_peers(with_feedback, "2S1F").include_feedback
    assert not variant_peers(with_feedback, "random_peer").include_feedback
    assert not variant_peers(with_feedback, "swapped_labels").include_feedback


def test_each_variant_records_what_it_showed_and_reports_join_only_when_it_agrees(tmp_path):
    """The settings each variant used are recorded apart (a 2S1F report sets summary_k to 0 whatever the run asked),
    so reports whose summaries context showed 1 and 7 summaries refuse to join."""
    from types import SimpleNamespace

    from mopd_lightning.analysis import resummarize, score_settings

    def module(summary_k):
        return SimpleNamespace(peers=PeerConfig(summaries="all", summary_k=summary_k), teacher_config=None,
                               roles=SimpleNamespace(teacher_kind="ema"), student_name="tiny", dtype_name="float32",
                               sampling=SimpleNamespace(group_size=4, temperature=1.0, top_p=1.0, top_k=0,
                                                        max_new_tokens=8), verifier=SimpleNamespace(strict=True))

    settings = {k: score_settings(module(k), ["2S1F", "1S+summaries"]) for k in (1, 7)}
    assert settings[7]["variant_peers"]["2S1F"]["summary_k"] == 0
    assert settings[7]["peer_context"]["summary_k"] == 7 and settings[1]["peer_context"]["summary_k"] == 1
    rows = [record("p0", True, -1.0, -0.5), record("p0", False, -1.0, -2.0)]
    a = _write(tmp_path / "a", rows, ["good"], **settings[1])
    b = _write(tmp_path / "b", [dict(r, prompt="p1") for r in rows], ["good"], **settings[7])
    with pytest.raises(ValueError, match="summary_k"):
        resummarize([a, b])


@pytest.mark.parametrize("lora", [False, True])
def test_records_on_a_tiny_model(tiny_model, lora):
    from mopd_lightning.config import LoRAConfig
    from mopd_lightning.lora import adapter_pairs

    module = make(tiny_model, lora=LoRAConfig(enabled=lora, rank=4))
    module.setup("fit")
    module.configure_model()
    with torch.no_grad():  # a LoRA student away from its base, its EMA teacher adapter equal to it
        for teacher, student in adapter_pairs(module.student):
            teacher.copy_(student.add_(0.3 * torch.randn_like(student)))
    records = teacher_signal_records(module, examples(3), ["none", "1S", "2S1F"])
    assert len(records) == 12 and {r["prompt"] for r in records} == {"toy-0", "toy-1", "toy-2"}
    for r in records:
        assert set(r["student_parts"]) == {"answer", "rest", "end"}  # the test verifier reads no answer span
        assert r["student_parts"]["answer"] is None and r["answer_len"] == 0
        # Before training the EMA teacher is the student: on the plain prompt it scores exactly like it.
        assert r["teacher"]["none"]["logp"] == pytest.approx(r["student_logp"], abs=1e-5)
        assert r["teacher"]["none"]["entropy"] == pytest.approx(r["student_entropy"], abs=1e-5)
        groups = [x for x in records if x["prompt"] == r["prompt"]]
        has_other_success = sum(x["success"] for x in groups) - r["success"] > 0
        assert (r["teacher"]["1S"] is not None) == has_other_success
        assert r["teacher"]["2S1F"] is not None  # every other rollout is a success or a failure


def test_the_reference_contexts_score_in_the_analysis(tiny_model, monkeypatch):
    """The summaries context and the two own-feedback ones on a tiny model whose run asks for summaries: every
    rollout with feedback gets a self_feedback record, and the length-matched controls score beside them."""
    from mopd_lightning.rewards import VERIFIERS

    monkeypatch.setitem(VERIFIERS, "parity_feedback", lambda strict, sandbox: lambda response, truth: Score(
        float(len(response) % 2 == 0), None if len(response) % 2 == 0 else "Odd length."))
    module = make(tiny_model, peers=PeerConfig(summaries="all", summary_k=3))
    module.setup("fit")
    module.configure_model()
    batch = [dataclasses.replace(e, verifier="parity_feedback") for e in examples(3)]
    assert "summary" in module.tokenizer.decode(module.render(batch[0].messages))  # the student is asked
    variants = ["2S1F", "random_peer", "1S+summaries", "2S1F_feedback_without_success", "self_feedback"]
    records = teacher_signal_records(module, batch, variants)
    assert {r["success"] for r in records} == {True, False}
    for r in records:  # the EMA teacher is the student: on the plain prompt (no feedback to show) it scores alike
        plain = r["teacher"]["self_feedback"]["logp"] == pytest.approx(r["student_logp"], abs=1e-5)
        assert plain == r["success"]  # only a failure has feedback, and it changes the teacher's view
        assert r["group_self_bleu"] is not None and 0 <= r["group_self_bleu"] <= 1
    summary = summarize(records, variants, samples=100)
    assert summary["self_bleu"]["n"] == 3 and set(summary["variants"]) == set(variants)
    assert "reveals its outcome" in markdown_report(summary, "t")


def test_a_written_report_is_resummarized_from_its_records(tmp_path):
    from mopd_lightning.analysis import resummarize

    records = [record(f"p{p}", ok, -1.0, -0.5 if ok else -2.0) for p in range(4) for ok in (True, False)]
    old = summarize(records, ["good", "bad"], samples=50)
    del old["variants"]["good"]["top1_hit"]  # a report written before a metric existed
    (tmp_path / "analysis.json").write_text(json.dumps({"meta": {"student": "tiny"}, "summary": old,
                                                        "records": records}))
    new = resummarize([str(tmp_path / "analysis.json")], str(tmp_path / "new"), samples=50)
    saved = json.loads((new / "analysis.json").read_text())
    assert saved["summary"] == summarize(records, ["good", "bad"], samples=50)
    assert saved["records"] == records and saved["meta"]["student"] == "tiny"
    table = (new / "analysis.md").read_text()
    assert table.count("| good |") == 3 and "top-1 hit" in table  # one row in each of the three tables


def test_the_students_own_confidence_is_the_bar_a_context_must_clear():
    """A teacher score that only echoes the student's confidence is no better than the student's log-prob alone;
    the paired margin over a label-blind control says whether the labels mattered."""
    records = []
    for p in range(5):
        for ok in (True, False, False):
            student = -0.5 if ok else -1.5  # the student is surer of its successes
            r = record(f"p{p}", ok, student, student - 0.25)
            r["teacher"]["random_peer"] = {"logp": 2 * student, "entropy": 1.2}  # the same order: content only
            r["teacher"]["swapped_labels"] = {"logp": student, "entropy": 1.2}  # a score of 0 for every rollout
            records.append(r)
    summary = summarize(records, ["good", "random_peer", "swapped_labels"], samples=100)
    assert summary["student_confidence"]["auc"]["mean"] == 1.0 and summary["student_confidence"]["auc"]["n"] == 5
    good = summary["variants"]["good"]
    assert good["auc"]["mean"] == 0.5  # score = teacher - student: -0.25 for every rollout
    assert good["auc_minus_random_peer"]["mean"] == pytest.approx(0.5 - 1.0)
    assert good["auc_minus_swapped_labels"]["mean"] == pytest.approx(0.0)
    assert summary["variants"]["random_peer"]["auc_minus_swapped_labels"]["mean"] == pytest.approx(0.5)
    assert "auc_minus_random_peer" not in summary["variants"]["random_peer"]
    from mopd_lightning.analysis import markdown_report

    table = markdown_report(summary, "t")
    assert "| *student's own log-prob (no teacher)* | 1.000" in table and "| AUC - random_peer | AUC - swapped_labels |" in table


def _write(folder, records, variants, **meta):
    folder.mkdir(parents=True)
    path = folder / "analysis.json"
    path.write_text(json.dumps({"meta": {"student": "tiny", "seed": 0, "wall_s": 10.0, **meta},
                                "summary": summarize(records, variants, samples=20), "records": records}))
    return str(path)


def test_reports_of_an_analysis_run_in_parts_are_joined(tmp_path):
    from mopd_lightning.analysis import resummarize

    first = [record(f"val{p}", ok, -1.0, -0.5 if ok else -2.0) for p in range(3) for ok in (True, False)]
    second = [record(f"train{p}", ok, -1.0, -2.0 if ok else -0.5) for p in range(2) for ok in (True, False)]
    a = _write(tmp_path / "a", first, ["good", "bad", "partial"])
    b = _write(tmp_path / "b", second, ["bad", "good"], wall_s=5.0, prompts="holdout (num_val 2)")
    joined = json.loads((resummarize([a, b], str(tmp_path / "both"), samples=50) / "analysis.json").read_text())
    assert joined["summary"] == summarize(first + second, ["good", "bad"], samples=50)  # the variants both scored
    assert joined["records"] == first + second and joined["summary"]["prompts"] == 5
    assert joined["meta"]["wall_s"] == 15.0 and joined["meta"]["joined"] == [a, b]
    assert joined["meta"]["prompts"] == [None, "holdout (num_val 2)"] and joined["meta"]["student"] == "tiny"


def test_reports_are_joined_only_with_the_same_settings_and_no_shared_prompt(tmp_path):
    from mopd_lightning.analysis import resummarize

    rows = [record("p0", True, -1.0, -0.5), record("p0", False, -1.0, -2.0)]
    a = _write(tmp_path / "a", rows, ["good"], group_size=8)
    with pytest.raises(ValueError, match=r"group_size \(4, not 8\) differ"):
        resummarize([a, _write(tmp_path / "b", [dict(r, prompt="p1") for r in rows], ["good"], group_size=4)])
    with pytest.raises(ValueError, match="prompt p0 is in both"):
        resummarize([a, _write(tmp_path / "c", rows, ["good"], group_size=8)])


@pytest.mark.parametrize("setting,first,second", [
    ("ckpt_path", "runs/a/last.ckpt", "runs/b/last.ckpt"),
    ("peer_context", {"dont_reprompt_on_self_success": True, "context_template": "{question} {peers}"},
     {"dont_reprompt_on_self_success": True, "context_template": "{question} then {peers}"}),
    ("top_p", 1.0, 0.9), ("top_k", 0, 50), ("dtype", "float32", "bfloat16"),
])
def test_reports_of_another_model_or_wording_are_not_joined(tmp_path, setting, first, second):
    """Two checkpoints, two peer wordings or two samplers are two analyses: a join refuses them, naming the setting."""
    from mopd_lightning.analysis import resummarize

    rows = [record("p0", True, -1.0, -0.5), record("p0", False, -1.0, -2.0)]
    a = _write(tmp_path / "a", rows, ["good"], **{setting: first})
    b = _write(tmp_path / "b", [dict(r, prompt="p1") for r in rows], ["good"], **{setting: second})
    with pytest.raises(ValueError, match=f"its {setting} .* differ from"):
        resummarize([a, b])


def test_the_analysis_never_shows_a_rollout_itself_whatever_the_training_setting():
    """With ``dont_reprompt_on_self_success: false`` training may show a success itself; the analysis measures what
    the peers tell the teacher, so no variant ever does, and swapped_labels shows only true failures as successes."""
    from mopd_lightning.peers import choose_peers, choose_summaries

    base = PeerConfig(dont_reprompt_on_self_success=False, summaries="all", summary_k=3)
    groups, success = [[0, 1, 2, 3]], [True, True, False, False]
    for name in CONTEXT_VARIANTS:
        config = variant_peers(base, name)
        for seed in range(100):
            whole = choose_peers(groups, success, config, [f"s{seed}"], lengths=[5, 9, 7, 6])
            summarized = choose_summaries(groups, success, whole, config, [f"s{seed}"])
            for r, chosen in enumerate(whole):
                assert r not in [p.rollout for p in chosen + summarized[r]], (name, seed, r)
                if name == "swapped_labels":
                    assert all(success[p.rollout] != p.shown_success for p in chosen)


def test_swapped_labels_in_training_shows_only_true_failures_as_successes():
    from mopd_lightning.peers import choose_peers

    config = PeerConfig(context="swapped_labels", dont_reprompt_on_self_success=False)
    groups, success = [[0, 1, 2, 3]], [True, True, False, False]
    for seed in range(100):
        for chosen in choose_peers(groups, success, config, [f"s{seed}"]):
            assert all(not success[p.rollout] for p in chosen if p.shown_success)


def test_the_answer_span_is_the_tokens_that_spell_the_answer(tiny_model):
    from transformers import AutoTokenizer

    from mopd_lightning.answers import response_parts
    from mopd_lightning.rewards.sci import answer_span

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = "Think briefly. The answer is B because 1 km is 1000 m. <answer>B</answer>"
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    parts = response_parts(tokenizer, ids, True, answer_span(text, strict=True))
    assert parts["end"] == [len(ids) - 1]
    assert "B" in tokenizer.decode([ids[k] for k in parts["answer"]]) and len(parts["answer"]) <= 2
    assert sorted(parts["answer"] + parts["rest"] + parts["end"]) == list(range(len(ids)))
    assert response_parts(tokenizer, ids[:-1], False, None) == {"answer": [], "rest": list(range(len(ids) - 1)),
                                                              "end": []}


def _parts_by_definition(tokenizer, ids, finished, span):
    """Every prefix decoded: a token is in the answer when the characters it adds overlap the span."""
    end = [len(ids) - 1] if finished and ids else []
    answer, before = [], 0
    for k in range(len(ids) - len(end)) if span else ():
        upto = len(tokenizer.decode(ids[:k + 1], skip_special_tokens=True))
        if upto > before and before < span[1] and upto > span[0]:
            answer.append(k)
        before = upto
    return answer


def test_the_answer_span_found_by_bisection_is_the_one_by_definition(tiny_model):
    """The bisection over prefix lengths gives the tokens the direct definition gives, on texts with multi-byte
    characters, spans at the start, the end, inside one token, and past the text."""
    import random

    from transformers import AutoTokenizer

    from mopd_lightning.answers import response_parts

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rng = random.Random(0)
    texts = ["The answer is B because 1 km is 1000 m. <answer>B</answer>", "Ünïcödé → ∑ x² = 42, so \\boxed{42}.",
             "A", "  spaces   and\nnewlines\n\nthen C", "déjà vu: 東京 is the answer (D)"]
    checked = 0
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for finished in (False, True):
            seq = ids + [tokenizer.eos_token_id] if finished else ids
            spans = [(0, 1), (len(text) - 1, len(text)), (len(text), len(text) + 5)]
            spans += [tuple(sorted(rng.sample(range(len(text) + 1), 2))) for _ in range(6) if len(text) > 1]
            for span in spans:
                parts = response_parts(tokenizer, seq, finished, span)
                assert parts["answer"] == _parts_by_definition(tokenizer, seq, finished, span), (text, span)
                checked += bool(parts["answer"])
    assert checked > 20  # the spans found tokens: the comparison was not between two empty lists


def parts_record(prompt, success, informative_answer, shown):
    """A rollout whose answer-span score separates successes when ``informative_answer`` and whose rest never does."""
    answer = (1.0 if success else -1.0) if informative_answer else 0.0
    return {"prompt": prompt, "reward": float(success), "success": success, "response_len": 20, "answer_len": 1,
            "student_logp": -1.0, "student_entropy": 1.0,
            "student_parts": {"answer": -2.0, "rest": -1.0, "end": -0.5},
            "teacher": {name: {"logp": -1.0 + answer / 20, "entropy": 1.0,
                               "parts": {"answer": -2.0 + answer, "rest": -1.0, "end": -0.5}}
                        for name in shown}}


def test_a_signal_on_the_answer_alone_is_found_where_the_whole_response_dilutes_it():
    records = [dict(parts_record(f"p{p}", ok, True, ["2S1F"]),
                    teacher={**parts_record(f"p{p}", ok, True, ["2S1F"])["teacher"],
                             **parts_record(f"p{p}", ok, False, ["random_peer"])["teacher"]})
               for p in range(6) for ok in (True, False, False)]
    summary = summarize(records, ["2S1F", "random_peer"], samples=50)
    informed, blind = summary["variants"]["2S1F"], summary["variants"]["random_peer"]
    assert informed["auc_answer"]["mean"] == 1.0 and informed["auc_rest"]["mean"] == 0.5
    assert informed["auc_end"]["mean"] == 0.5 and blind["auc_answer"]["mean"] == 0.5
    assert informed["auc_answer_minus_random_peer"]["mean"] == 0.5
    assert summary["student_confidence"]["auc_answer"]["mean"] == 0.5
    from mopd_lightning.analysis import markdown_report

    table = markdown_report(summary, "t")
    assert "**Where does the signal sit?**" in table and "| 2S1F | 1.000" in table.split("Where does")[1]


def one_step_seen_before_its_update(module, monkeypatch, look):
    """One training step on 4 of 8 parity prompts, calling ``look(batch, rollouts, signal)`` after the teacher
    phase and before the update moves any weight; the step's logged metrics."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from mopd_lightning.data.datamodule import PromptStream

    real_signal, real_update, seen = module.training_signal, module.update_student, {}

    def remembering(batch, rollouts):
        seen["batch"] = batch
        return real_signal(batch, rollouts)

    def looked_then_updated(rollouts, signal):
        look(seen["batch"], rollouts, signal)
        return real_update(rollouts, signal)

    monkeypatch.setattr(module, "training_signal", remembering)
    monkeypatch.setattr(module, "update_student", looked_then_updated)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(PromptStream(examples(8), 4, seed=0, shuffle=False),
                                                     batch_size=None))
    return trainer.logged_metrics


def test_the_steps_teacher_signal_metrics_are_the_analysis_of_its_own_contexts(tiny_model, monkeypatch):
    """``train/teacher_auc``, ``_auc_answer``, ``_entropy_gap`` and the favoured fractions, logged from the training
    step's own passes, equal the analysis's statistics computed by its own scoring passes on the same rollouts and
    contexts, before the update moves any weight."""
    from mopd_lightning.analysis import score, summarize
    from mopd_lightning.rewards.registry import ANSWER_SPANS
    from mopd_lightning.scoring import mean_logp_and_entropy, output_weight, score_rollouts

    monkeypatch.setitem(ANSWER_SPANS, "parity", lambda text, strict, truth: (0, 3) if len(text) >= 3 else None)
    module = make(tiny_model, peers=PeerConfig(require_success=False))
    expected = {}

    def analysed(batch, rollouts, signal):
        taught = sorted(signal.teacher_hidden)
        lengths = {r: len(rollouts.response_ids[r]) for r in taught}
        parts = {r: {"answer": signal.answer_positions[r]} for r in taught}
        plain = {r: rollouts.prompt_ids[r] + rollouts.response_ids[r] for r in taught}
        teacher_sequences = {r: signal.contexts[r].prompt_ids + rollouts.response_ids[r] for r in taught}
        with module.run_as(module.roles.student) as model:
            student = mean_logp_and_entropy(score_rollouts(model, plain, lengths, module.tokenizer.pad_token_id, 4096),
                                            output_weight(model), rollouts.response_ids, parts)
        teacher = mean_logp_and_entropy(*module.score_teacher(teacher_sequences, lengths), rollouts.response_ids, parts)
        records = [{"prompt": rollouts.group[r], "reward": rollouts.reward[r], "success": rollouts.success[r],
                    "student_logp": student[r]["logp"], "student_entropy": student[r]["entropy"],
                    "student_parts": student[r]["parts"], "teacher": {"2S1F": teacher[r]}} for r in taught]
        summary = summarize(records, ["2S1F"], samples=10)["variants"]["2S1F"]
        expected.update({"train/teacher_auc": summary["auc"]["mean"], "train/teacher_auc_answer":
                         summary["auc_answer"]["mean"], "train/teacher_entropy_gap": summary["entropy_gap"]["mean"],
                         "train/teacher_auc_prompts": summary["auc"]["n"]})
        for outcome, name in ((True, "success"), (False, "failure")):
            scores = [score(rec, "2S1F") > 0 for rec in records if rec["success"] == outcome]
            expected[f"train/teacher_favours_{name}_fraction"] = sum(scores) / len(scores)

    logged = one_step_seen_before_its_update(module, monkeypatch, analysed)
    assert expected["train/teacher_auc_prompts"] >= 2 and expected["train/teacher_auc_answer"] is not None
    for key, value in expected.items():
        assert abs(float(logged[key]) - value) < 1e-4, key


def test_the_label_contrasts_auc_is_that_of_the_teacher_under_true_minus_swapped_labels(tiny_model, monkeypatch):
    """``train/contrast_auc`` (and ``_answer``), logged with ``label_contrast``: over the step's prompts with both
    outcomes, the mean AUC of each rollout's mean log-prob under its true context minus under the same peers with
    swapped labels, both scored here again by the teacher before the update."""
    from mopd_lightning.config import LossConfig
    from mopd_lightning.peers import build_teacher_contexts
    from mopd_lightning.rewards.registry import ANSWER_SPANS
    from mopd_lightning.scoring import mean_logp_and_entropy

    monkeypatch.setitem(ANSWER_SPANS, "parity", lambda text, strict, truth: (0, 3) if len(text) >= 3 else None)
    module = make(tiny_model, peers=PeerConfig(require_success=False),
                  loss=LossConfig(estimator="label_contrast", alpha=1.0))
    expected = {}

    def analysed(batch, rollouts, signal):
        taught = sorted(signal.teacher_hidden)
        lengths = {r: len(rollouts.response_ids[r]) for r in taught}
        parts = {r: {"answer": signal.answer_positions[r]} for r in taught}
        swapped = build_teacher_contexts(batch, rollouts, module.tokenizer, module.peers,
                                         f"{module.seed}:{module.rollout_batches}", swap_labels=True)
        scored = [mean_logp_and_entropy(*module.score_teacher(
            {r: contexts[r].prompt_ids + rollouts.response_ids[r] for r in taught}, lengths),
            rollouts.response_ids, parts) for contexts in (signal.contexts, swapped)]
        groups = {}
        for r in taught:
            groups.setdefault(rollouts.group[r], []).append(r)
        for key, value in (("auc", lambda x, r: x[r]["logp"]), ("auc_answer", lambda x, r: x[r]["parts"]["answer"])):
            aucs = []
            for members in groups.values():
                members = [r for r in members if value(scored[0], r) is not None]
                contrast = {r: value(scored[0], r) - value(scored[1], r) for r in members}
                successes = [contrast[r] for r in members if rollouts.success[r]]
                failures = [contrast[r] for r in members if not rollouts.success[r]]
                if successes and failures:
                    aucs.append(auc(successes, failures))
            expected[f"train/contrast_{key}"] = sum(aucs) / len(aucs)

    logged = one_step_seen_before_its_update(module, monkeypatch, analysed)
    assert set(expected) == {"train/contrast_auc", "train/contrast_auc_answer"}
    for key, value in expected.items():
        assert abs(float(logged[key]) - value) < 1e-4, key


def test_the_choice_target_is_each_options_token_where_the_answer_starts(tiny_model):
    """At the answer's first token, the token that would have named each option in its place; the right one is the
    ground truth's; a response without a chosen letter, a domain without options, or a written token whose other
    letters are not one token each (this tokenizer's " C" is two) has none."""
    from transformers import AutoTokenizer

    from mopd_lightning.answers import choice_targets, rollout_parts
    from mopd_lightning.data.example import Example
    from mopd_lightning.rollouts import Rollouts

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    question = "Which river?\nA. Arn\nB. Bel\nC. Cor\nD. Dun"
    batch = [Example("q", [{"role": "user", "content": question}], "C", "sci"),
             Example("m", [{"role": "user", "content": "1+1?"}], "2", "math")]
    texts = ["I think the answer is (B)", "<answer>C</answer>", "no idea at all", "\\boxed{2}", "the answer is B"]
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    rollouts = Rollouts([0, 0, 0, 1, 0], [[1]] * 5, ids, texts, [False] * 5)
    parts = rollout_parts(batch, rollouts, tokenizer, False, range(5))
    targets = choice_targets(batch, rollouts, tokenizer, parts, False)
    assert set(targets) == {0, 1}
    for r, written in ((0, "B"), (1, "C")):
        target = targets[r]
        assert target.labels == tuple("ABCD") and target.right == 2 and target.position == parts[r]["answer"][0]
        assert target.options[target.labels.index(written)] == ids[r][target.position]
        assert [tokenizer.decode([t]).strip() for t in target.options] == list("ABCD")


def test_a_named_answers_choice_target_is_each_options_first_token_where_the_name_starts(tiny_model):
    """Answered by name (``facts_named``): at the name's first token, the first token of each option's name in its
    place (after what that token holds before the name, a space here); none where no single option is named."""
    from transformers import AutoTokenizer

    from mopd_lightning.answers import choice_targets, rollout_parts
    from mopd_lightning.data.example import Example
    from mopd_lightning.rollouts import Rollouts

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    names = ["Ulel River", "Arhar River", "Rosgal River", "Beldun River"]
    batch = [Example("q", [{"role": "user", "content": "Which river?"}], {"answer": "Arhar River", "options": names},
                     "named")]
    texts = ["<answer>Rosgal River</answer>", "It is Arhar River", "Ulel River or Arhar River", "no idea"]
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    rollouts = Rollouts([0] * 4, [[1]] * 4, ids, texts, [False] * 4)
    parts = rollout_parts(batch, rollouts, tokenizer, False, range(4))
    targets = choice_targets(batch, rollouts, tokenizer, parts, False)
    # " Arhar" and " Rosgal" start with " A" and " " + "R" in this tokenizer: the options' first tokens after a
    # space are not all different, so the untagged answer (rollout 1) has none; two options named: none either.
    assert set(targets) == {0}
    target = targets[0]
    assert target.labels == tuple(names) and target.right == 1 and target.position == parts[0]["answer"][0]
    assert target.options[2] == ids[0][target.position]  # the written token is the chosen name's
    assert [tokenizer.decode([t])[-1] for t in target.options] == ["U", "A", "R", "B"]


def test_choice_mass_is_the_softmax_at_the_answer_position_at_each_temperature():
    from mopd_lightning.answers import ChoiceTarget
    from mopd_lightning.scoring import choice_mass

    torch.manual_seed(0)
    hidden, weight = {0: torch.randn(5, 8)}, torch.randn(40, 8)
    target = ChoiceTarget(position=3, options=[7, 11, 2, 30], labels=tuple("ABCD"), right=1)
    got = choice_mass(hidden, weight, {0: target, 1: target}, (1.0, 0.5))
    assert set(got) == {0}  # a rollout without hidden states is left out
    logits = (hidden[0][3].double() @ weight.double().T)
    for t in (1.0, 0.5):
        p = torch.softmax(logits / t, -1)
        assert abs(got[0]["right"][str(t)] - float(p[11])) < 1e-5
        assert abs(got[0]["share"][str(t)] - float(p[11] / p[[7, 11, 2, 30]].sum())) < 1e-5
    log_p = torch.log_softmax(logits, -1)
    assert abs(got[0]["entropy"] - float(-(log_p.exp() * log_p).sum())) < 1e-4


def _choice_record(success, student_right, teacher_right, shows_success=True):
    choice = lambda p: {"right": {"1.0": p, "0.5": min(1.0, 1.5 * p)}, "share": {"1.0": p, "0.5": p}, "entropy": 1.0}
    return {"prompt": "p", "success": success, "reward": float(success), "student_logp": -1.0, "student_entropy": 1.0,
            "student_choice": {**choice(student_right), "right": {"1.0": student_right}, "share": {"1.0": student_right}},
            "teacher": {"2S1F": {"logp": -1.0, "entropy": 1.0, "choice": choice(teacher_right),
                                 "shows_success": shows_success}}}


def test_the_choice_summary_says_where_the_teacher_points_for_failures_shown_a_success_and_for_successes():
    """Positive control and its negative: a teacher that moves mass to the right option on failures shown a success
    gives a positive gap there; one that flattens gives a negative one; failures not shown a success are left out."""
    from mopd_lightning.analysis import choice_summary

    pointing = [_choice_record(False, 0.2, 0.5), _choice_record(False, 0.1, 0.4), _choice_record(True, 0.6, 0.7),
                _choice_record(False, 0.3, 0.0, shows_success=False)]
    summary = choice_summary(pointing, "2S1F", samples=50)
    assert summary["failures_shown_success"]["right_gap"]["1.0"]["n"] == 2
    assert abs(summary["failures_shown_success"]["right_gap"]["1.0"]["mean"] - 0.3) < 1e-9
    assert abs(summary["successes"]["right_gap"]["1.0"]["mean"] - 0.1) < 1e-9
    flattening = [_choice_record(False, 0.5, 0.3), _choice_record(True, 0.8, 0.4)]
    summary = choice_summary(flattening, "2S1F", samples=50)
    assert summary["failures_shown_success"]["right_gap"]["1.0"]["mean"] < 0
    assert summary["successes"]["right_gap"]["1.0"]["mean"] < 0
    assert choice_summary([{**r, "student_choice": None} for r in pointing], "2S1F") == {}
