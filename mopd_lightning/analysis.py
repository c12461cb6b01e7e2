"""Teacher-signal analysis: does a peer context tell the teacher which rollouts of a group are right?

For every rollout and every context variant, the teacher's *score* is the mean log-probability of the
rollout's tokens under ``[teacher prompt ; response]`` minus the student's under ``[prompt ; response]``. MOPD
can only help when that score separates successes from failures: per prompt holding both, we measure the AUC
of the score against success, the pairwise accuracy (share of pairs with different rewards that the score orders
as the rewards) and the Spearman correlation with the reward; and, per variant, the teacher-minus-student entropy
gap (a context that raises the teacher's entropy pushes the student's entropy up). Prompt means with bootstrap
95% intervals. The reference's other teacher-signal metrics (Kendall as it computes it, point-biserial
correlation, Brier score, top-1 hit rate) are reported beside them, and the student-to-teacher gap per context,
which is reported to predict the gain of self-distillation linearly.

Two references keep a score above chance from being read as peer information. Any context moves the teacher away
from the student most on the rollouts the student was least sure of (the score is minus a per-token KL on the
student's own samples), and unsure rollouts fail more often: so the student's own mean log-prob, with no teacher, is
reported with the same metrics. And each context's AUC is compared, prompt by prompt, with the label-blind controls
(random_peer, swapped_labels): only a margin over them says the verified labels reached the teacher.

Run it before spending GPU hours: ``mopd analyze --config configs/sci.yaml [--ckpt_path ...]``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .answers import PARTS, choice_targets, rollout_parts
from .config import LABEL_BLIND, ConfigError, PeerConfig
from .diversity import self_bleu
from .peers import build_teacher_contexts
from .scoring import choice_mass, mean_logp_and_entropy, output_weight, score_rollouts

log = logging.getLogger(__name__)

CONTEXT_VARIANTS: Dict[str, Dict[str, Any]] = {
    "none": dict(context="none"),
    "1S": dict(n_success=1, n_failure=0),
    "2S": dict(n_success=2, n_failure=0),
    "1F": dict(n_success=0, n_failure=1),
    "1S1F": dict(n_success=1, n_failure=1),
    "2S1F": dict(n_success=2, n_failure=1),
    "random_peer": dict(n_success=2, n_failure=1, context="random_peer"),
    "unrelated_prompt": dict(n_success=2, n_failure=1, context="unrelated_prompt"),
    "swapped_labels": dict(n_success=2, n_failure=1, context="swapped_labels"),
    "success_only_matched": dict(n_success=2, n_failure=1, context="success_only_matched"),
    "1S+summaries": dict(n_success=1, n_failure=0),  # and the summaries the run asked for (variant_peers)
    "2S1F_feedback_without_success": dict(n_success=2, n_failure=1, self_feedback="without_success"),
    "self_feedback": dict(context="none", self_feedback="always"),
}
"""Context variants: the paper's peer mixes and its controls (the controls at the 2S1F size); the reference's
shipped default, one success shown whole and the summaries of ``summary_k`` others (``1S+summaries``: the run must
ask for summaries, ``model.peers.summaries``); and its environment feedback: 2S1F with the rollout's own feedback
where no success is shown, and the rollout's own feedback alone (SDPO's self-feedback)."""

SUMMARIES = "1S+summaries"

OWN_LABEL = ("2S1F_feedback_without_success", "self_feedback")
"""Variants that show a rollout its own verifier feedback, hence its own outcome: what they separate is read off
the label, not learnt from peers. Scored only when asked for (``--analyze.variants``) and reported apart."""
DEFAULT_VARIANTS = tuple(name for name in CONTEXT_VARIANTS if name not in OWN_LABEL + (SUMMARIES,))


def variant_peers(base: PeerConfig, name: str) -> PeerConfig:
    """``base`` (templates, budgets, ``control_match``) with the peer mix of variant ``name``; failures always
    included, no gate, and a rollout never shown itself (``dont_reprompt_on_self_success``): the analysis measures
    what the peers tell the teacher about a rollout, never the rollout's own label. The label-blind controls never
    show the peers' feedback (``include_feedback``), which states their outcome."""
    if name not in CONTEXT_VARIANTS:
        raise ValueError(f"unknown context variant {name!r}; known: {', '.join(CONTEXT_VARIANTS)}")
    settings = dict(n_success=base.n_success, n_failure=base.n_failure, context="peers", failure_when="always",
                    require_success=False, dont_reprompt_on_self_success=True, self_feedback="never",
                    summary_k=0)  # a run that asks for summaries keeps asking (its prompts); only this variant shows them
    settings.update(CONTEXT_VARIANTS[name])
    if settings["context"] in LABEL_BLIND:
        settings["include_feedback"] = False
    if name == SUMMARIES:
        if base.summaries == "off" or base.summary_k == 0:
            raise ConfigError(f"analyze.variants: {SUMMARIES} shows the summaries the student was asked for: set "
                              "model.peers.summaries and summary_k (the reference's launcher: all, 7)")
        settings["summary_k"] = base.summary_k
    return dataclasses.replace(base, **settings)


def score_settings(module, variants: Sequence[str]) -> Dict[str, Any]:
    """Every setting of ``module`` that changes a score, as the report records it: the run's peer settings, and
    per variant the peer settings it changed (what it actually showed: its mix, its summaries, its feedback).
    Reports are joined only when these (and the checkpoint, precision and seed) agree."""
    peers = module.peers
    teacher = module.teacher_config
    return {"student": module.student_name, "dtype": module.dtype_name, "group_size": module.sampling.group_size,
            "temperature": module.sampling.temperature, "top_p": module.sampling.top_p,
            "top_k": module.sampling.top_k, "max_new_tokens": module.sampling.max_new_tokens,
            "max_peer_tokens": peers.max_peer_tokens, "verifier": vars(module.verifier),
            "teacher": module.roles.teacher_kind,
            "teacher_path": teacher.path if module.roles.teacher_kind == "external" else None,
            "teacher_mix": teacher.mix if module.roles.teacher_kind == "trust_region" else None,
            "peer_context": {key: value for key, value in vars(peers).items() if key != "max_peer_tokens"},
            "variant_peers": {name: {key: value for key, value in vars(variant_peers(peers, name)).items()
                                     if value != getattr(peers, key)} for name in variants}}


TEACHER_TEMPERATURES = (1.0, 0.7, 0.5, 0.3)
"""Temperatures of the teacher at which the analysis measures its mass on the right option (the student's is 1):
what ``model.loss.teacher_temperature`` would make of the same teacher."""


@torch.no_grad()
def teacher_signal_records(module, batch, variants: Sequence[str]) -> List[Dict[str, Any]]:
    """Sample and verify groups for ``batch``, then score every rollout under every context variant.

    One record per rollout: its prompt, reward, success, the student's mean log-prob and entropy on its own
    tokens (and the mean log-prob on each of its parts: the answer span, the rest, the end-of-turn token), and per
    variant the teacher's (None where the variant gives that rollout no context).
    """
    started = time.monotonic()
    if module.sampling.backend == "vllm":
        module.sync_engine()
    rollouts = module.sample(batch, "analyze", module.sampling.group_size, module.sampling.temperature)
    module.verify(batch, rollouts)
    log.info("analysis: %d rollouts of %d prompts sampled and verified (%.0f s)", len(rollouts), len(batch),
             time.monotonic() - started)
    lengths = {r: len(ids) for r, ids in enumerate(rollouts.response_ids)}
    pad, budget, packed = module.tokenizer.pad_token_id, module.optim.max_tokens_per_micro_batch, module.optim.packed
    plain = {r: rollouts.prompt_ids[r] + ids for r, ids in enumerate(rollouts.response_ids) if ids}
    parts = rollout_parts(batch, rollouts, module.tokenizer, module.verifier.strict, list(plain))
    targets = choice_targets(batch, rollouts, module.tokenizer, parts, module.verifier.strict)
    with module.run_as(module.roles.student) as model:
        hidden = score_rollouts(model, plain, lengths, pad, budget, packed)
        student = mean_logp_and_entropy(hidden, output_weight(model), rollouts.response_ids, parts)
        student_choice = choice_mass(hidden, output_weight(model), targets, (1.0,))
    per_variant = {}
    for name in variants:
        contexts = build_teacher_contexts(batch, rollouts, module.tokenizer, variant_peers(module.peers, name),
                                          seed_key=f"{module.seed}:analyze")
        sequences = {r: c.prompt_ids + rollouts.response_ids[r] for r, c in enumerate(contexts)
                     if c.active and r in plain}
        hidden, head = module.score_teacher(sequences, lengths)
        per_variant[name] = mean_logp_and_entropy(hidden, head, rollouts.response_ids, parts)
        for r, choice in choice_mass(hidden, head, targets, TEACHER_TEMPERATURES).items():
            per_variant[name][r]["choice"] = choice
        for r in per_variant[name]:  # shown a success of its own group, truly (not as a control labels it)
            per_variant[name][r]["shows_success"] = any(
                rollouts.success[p.rollout] and rollouts.group[p.rollout] == rollouts.group[r]
                for p in contexts[r].peers + contexts[r].summarized)
        log.info("analysis: context %s scored (%d of %d; %.0f s)", name, len(per_variant), len(variants),
                 time.monotonic() - started)
    diversity = [self_bleu([rollouts.response_text[r] for r in members], batch[g].verifier == "code")
                 for g, members in enumerate(rollouts.groups)]
    records = []
    for r in plain:
        example = batch[rollouts.group[r]]
        records.append({
            "prompt": example.id, "reward": rollouts.reward[r], "success": rollouts.success[r],
            "response_len": lengths[r], "answer_len": len(parts[r]["answer"]), "student_logp": student[r]["logp"],
            "student_entropy": student[r]["entropy"], "student_parts": student[r]["parts"],
            "student_choice": student_choice.get(r),
            "teacher": {name: scores.get(r) for name, scores in per_variant.items()},
            "group_self_bleu": diversity[rollouts.group[r]],
        })
    return records


# -- statistics ---------------------------------------------------------------------------------------------
# Per prompt with both outcomes, each of the reference's teacher-signal metrics (``analysis/
# compute_teacher_signal_metrics.py`` in the paper's code), with two deliberate differences: a metric that is
# undefined on a prompt (a constant side of a correlation) is left out of the mean rather than counted as 0, and
# ties in score count one half wherever a pair or a top rollout is judged (the reference's AUC does the same; its
# pairwise accuracy counts a tied pair as wrong, and its top-1 takes the first of tied rollouts).
def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(score of a success > score of a failure), ties counting one half (Mann-Whitney)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def _pairs(scores: Sequence[float], rewards: Sequence[float]):
    """(score difference, reward difference) of every pair with different rewards."""
    n = len(scores)
    return [(scores[i] - scores[j], rewards[i] - rewards[j]) for i in range(n) for j in range(i + 1, n)
            if rewards[i] != rewards[j]]


def pairwise_accuracy(scores: Sequence[float], rewards: Sequence[float]) -> Optional[float]:
    """Share of the pairs with different rewards that the scores order as the rewards do, a tie in score counting
    one half; None without such pairs. On 0/1 rewards this is the AUC; graded rewards (code's share of tests
    passed) also count pairs of two partial answers."""
    pairs = _pairs(scores, rewards)
    if not pairs:
        return None
    return sum((ds * dr > 0) + 0.5 * (ds == 0) for ds, dr in pairs) / len(pairs)


def kendall_gamma(scores: Sequence[float], rewards: Sequence[float]) -> Optional[float]:
    """(concordant - discordant) / (concordant + discordant) over pairs untied in both score and reward: what the
    reference reports as Kendall's tau, which is Goodman and Kruskal's gamma; None without untied pairs."""
    concordant = [(ds > 0) == (dr > 0) for ds, dr in _pairs(scores, rewards) if ds != 0]
    return (2 * sum(concordant) - len(concordant)) / len(concordant) if concordant else None


def pearson(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Pearson's correlation; None when either side is constant."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def point_biserial(scores: Sequence[float], success: Sequence[bool]) -> Optional[float]:
    """Pearson's correlation of the score with success (0/1)."""
    return pearson(scores, [float(s) for s in success])


def brier(scores: Sequence[float], success: Sequence[bool]) -> float:
    """Mean squared error of the prompt's min-max scaled scores as probabilities of success (0.5 each when all
    scores are equal): 0 is perfect, 0.25 what a constant 0.5 gets. The reference's variant that reads
    sigmoid(score) as the probability suits a raw log-prob, not this score (a difference of log-probs)."""
    low, high = min(scores), max(scores)
    probabilities = [0.5 if high == low else (v - low) / (high - low) for v in scores]
    return sum((p - float(s)) ** 2 for p, s in zip(probabilities, success)) / len(scores)


def brier_sigmoid(mean_logps: Sequence[float], success: Sequence[bool]) -> float:
    """The reference's other Brier score: sigmoid of the teacher's mean log-prob on the rollout (not of this
    analysis's score) read as the probability of success. A mean log-prob is at most 0, so the probability is at
    most 0.5: the score mixes calibration with how likely the teacher finds the text at all."""
    return sum((1 / (1 + math.exp(-v)) - float(s)) ** 2 for v, s in zip(mean_logps, success)) / len(mean_logps)


def top1_hit(scores: Sequence[float], success: Sequence[bool]) -> float:
    """Whether the highest-scored rollout succeeds; with tied top scores, the share of them that succeed (the hit
    rate of breaking the tie at random)."""
    best = max(scores)
    top = [s for v, s in zip(scores, success) if v == best]
    return sum(top) / len(top)


def _ranks(values: Sequence[float]) -> List[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Spearman's rank correlation (average ranks for ties); None when either side is constant."""
    return pearson(_ranks(x), _ranks(y))


def bootstrap_mean(values: Sequence[float], samples: int = 1000, seed: int = 0) -> Dict[str, Optional[float]]:
    """Mean with a percentile bootstrap 95% interval (resampling the values, e.g. prompts)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(samples))
    low, high = means[int(0.025 * (samples - 1))], means[int(0.975 * (samples - 1))]
    return {"mean": sum(values) / n, "low": low, "high": high, "n": n}


SEPARATION = ("auc", "pairwise_accuracy", "spearman", "kendall_gamma", "point_biserial", "brier", "brier_sigmoid",
              "top1_hit")
"""Metrics of how well the score separates a prompt's successes from its failures (prompts with both)."""
PART_AUCS = tuple(f"auc_{part}" for part in PARTS)
"""The AUC of the score on each part of the response alone."""

# The label-blind controls (``config.LABEL_BLIND``) show the group's rollouts with labels that say nothing
# (random_peer) or against the verifier's (swapped_labels). A context whose AUC does not beat theirs, prompt by
# prompt, uses what the peers say, not whether they succeeded: the success-and-failure contrast MOPD is built on is
# not what moves its teacher.


def score(record: Dict[str, Any], variant: str) -> float:
    """A rollout's score under a context: teacher minus student mean log-prob on the rollout's own tokens."""
    return record["teacher"][variant]["logp"] - record["student_logp"]


def part_score(record: Dict[str, Any], variant: Optional[str], part: str) -> Optional[float]:
    """The same score on one part of the response (``PARTS``); the student's own mean log-prob there when
    ``variant`` is None; None where the rollout has no such part (or its record predates parts)."""
    student = (record.get("student_parts") or {}).get(part)
    if variant is None or student is None:
        return student
    teacher = ((record["teacher"].get(variant) or {}).get("parts") or {}).get(part)
    return None if teacher is None else teacher - student


def _part_aucs(group: Sequence[Dict[str, Any]], variant: Optional[str]) -> Dict[str, float]:
    """Per part, the AUC of the part's score over the prompt's rollouts that have that part (both outcomes needed)."""
    out = {}
    for part in PARTS:
        scored = [(r["success"], part_score(r, variant, part)) for r in group]
        positive = [v for ok, v in scored if ok and v is not None]
        negative = [v for ok, v in scored if not ok and v is not None]
        if positive and negative:
            out[f"auc_{part}"] = auc(positive, negative)
    return out


def separation(scores: Sequence[float], rewards: Sequence[float], success: Sequence[bool],
               mean_logps: Sequence[float]) -> Dict[str, float]:
    """The separation metrics of one prompt's rollouts (it must hold both outcomes); undefined ones left out.
    ``mean_logps``: the scoring model's own mean log-prob of each rollout (for the sigmoid Brier score)."""
    positive = [v for v, ok in zip(scores, success) if ok]
    negative = [v for v, ok in zip(scores, success) if not ok]
    values = {"auc": auc(positive, negative), "pairwise_accuracy": pairwise_accuracy(scores, rewards),
              "spearman": spearman(scores, rewards), "kendall_gamma": kendall_gamma(scores, rewards),
              "point_biserial": point_biserial(scores, success), "brier": brier(scores, success),
              "brier_sigmoid": brier_sigmoid(mean_logps, success), "top1_hit": top1_hit(scores, success)}
    return {key: value for key, value in values.items() if value is not None}  # a constant side: left out, not 0


def summarize(records: Sequence[Dict[str, Any]], variants: Sequence[str], samples: int = 2000,
              seed: int = 0) -> Dict[str, Any]:
    """Per variant: the separation metrics over prompts with both outcomes, and the AUC's paired difference to each
    label-blind control scored beside it; the score, the student-to-teacher gap (student minus teacher mean log-prob
    on the student's own tokens: a per-token estimate of KL(student || teacher)) and the entropy gap over all prompts
    (each prompt's mean first, so every prompt weighs the same). Also the separation that the student's own mean
    log-prob achieves with no teacher at all: the bar a teacher's score must clear to add anything."""
    prompts: Dict[str, List[Dict[str, Any]]] = {}
    for record in records:
        prompts.setdefault(record["prompt"], []).append(record)
    mixed = {p: group for p, group in prompts.items() if len({r["success"] for r in group}) == 2}
    summary = {"prompts": len(prompts), "rollouts": len(records),
               "success_rate": sum(r["success"] for r in records) / max(len(records), 1),
               "mixed_prompts": len(mixed), "variants": {},
               "self_bleu": bootstrap_mean([group[0]["group_self_bleu"] for group in prompts.values()
                                            if group[0].get("group_self_bleu") is not None], samples, seed)}
    confidence = [{**separation([r["student_logp"] for r in group], [r["reward"] for r in group],
                                [r["success"] for r in group], [r["student_logp"] for r in group]),
                   **_part_aucs(group, None)} for group in mixed.values()]
    summary["student_confidence"] = {key: bootstrap_mean([c[key] for c in confidence if key in c], samples, seed)
                                     for key in SEPARATION + PART_AUCS}
    prompt_auc: Dict[str, Dict[str, Dict[str, float]]] = {}  # variant -> auc or auc_<part> -> prompt -> value
    for name in variants:
        per_prompt = {key: [] for key in SEPARATION + PART_AUCS + ("score", "gap", "entropy_gap", "success_score",
                                                                     "failure_score")}
        prompt_auc[name] = {key: {} for key in ("auc",) + PART_AUCS}
        scored_rollouts = 0
        for prompt, group in prompts.items():
            scored = [(r, score(r, name), r["teacher"][name]["entropy"] - r["student_entropy"])
                      for r in group if r["teacher"].get(name)]
            if not scored:
                continue
            scored_rollouts += len(scored)
            per_prompt["score"].append(sum(s for _, s, _ in scored) / len(scored))
            per_prompt["gap"].append(-per_prompt["score"][-1])
            per_prompt["entropy_gap"].append(sum(e for _, _, e in scored) / len(scored))
            positive = [s for r, s, _ in scored if r["success"]]
            negative = [s for r, s, _ in scored if not r["success"]]
            if positive:
                per_prompt["success_score"].append(sum(positive) / len(positive))
            if negative:
                per_prompt["failure_score"].append(sum(negative) / len(negative))
            if positive and negative:
                values = separation([s for _, s, _ in scored], [r["reward"] for r, _, _ in scored],
                                    [r["success"] for r, _, _ in scored],
                                    [r["teacher"][name]["logp"] for r, _, _ in scored])
                values.update(_part_aucs([r for r, _, _ in scored], name))
                for key, value in values.items():
                    per_prompt[key].append(value)
                    if key in prompt_auc[name]:
                        prompt_auc[name][key][prompt] = value
        summary["variants"][name] = {"rollouts_scored": scored_rollouts}
        if "2S1F" in variants:  # a control covers what the method covers, or says how much it left out
            summary["variants"][name]["left_out_of_2S1F"] = sum(
                1 for r in records if r["teacher"].get("2S1F") and not r["teacher"].get(name))
        summary["variants"][name].update({key: bootstrap_mean(values, samples, seed)
                                          for key, values in per_prompt.items()})
    for name in variants:
        choice = choice_summary(records, name, samples, seed)
        if choice:
            summary["variants"][name]["choice"] = choice
    for name in variants:
        for control in LABEL_BLIND:
            if control in prompt_auc and control != name:
                for key in ("auc", "auc_answer"):  # the whole response, and the answer span alone
                    mine, theirs = prompt_auc[name][key], prompt_auc[control][key]
                    summary["variants"][name][f"{key}_minus_{control}"] = bootstrap_mean(
                        [mine[p] - theirs[p] for p in mine if p in theirs], samples, seed)
    return summary


CHOICE_SUBSETS = {"failures_shown_success": "failures shown a success", "successes": "successes"}


def choice_summary(records: Sequence[Dict[str, Any]], variant: str, samples: int = 2000,
                   seed: int = 0) -> Dict[str, Any]:
    """Where the teacher's distribution points on a multiple-choice answer, which is what training moves the student
    toward: at the answer's first token, the teacher's probability of the right option minus the student's (and of
    its share of the options' mass), at each teacher temperature, and the entropy gap there; for failures whose
    context shows a success of their group, and for successes. Below 0 for the failures: the teacher does not point
    at what the shown success says, and distillation cannot teach it (over rollouts; empty without choices)."""
    out = {}
    for subset in CHOICE_SUBSETS:
        pairs = [(r["student_choice"], r["teacher"][variant]["choice"]) for r in records
                 if r.get("student_choice") and (r["teacher"].get(variant) or {}).get("choice")
                 and (r["success"] if subset == "successes" else
                      not r["success"] and r["teacher"][variant].get("shows_success"))]
        if not pairs:
            continue
        temperatures = list(pairs[0][1]["right"])
        out[subset] = {
            "student_right": bootstrap_mean([s["right"]["1.0"] for s, _ in pairs], samples, seed),
            "teacher_right": {t: bootstrap_mean([c["right"][t] for _, c in pairs], samples, seed) for t in temperatures},
            "right_gap": {t: bootstrap_mean([c["right"][t] - s["right"]["1.0"] for s, c in pairs], samples, seed)
                          for t in temperatures},
            "share_gap": {t: bootstrap_mean([c["share"][t] - s["share"]["1.0"] for s, c in pairs], samples, seed)
                          for t in temperatures},
            "entropy_gap": bootstrap_mean([c["entropy"] - s["entropy"] for s, c in pairs], samples, seed),
        }
    return out


def _choice_table(summary: Dict[str, Any]) -> List[str]:
    rows = [(name, subset, stats["choice"][subset]) for name, stats in summary["variants"].items()
            for subset in CHOICE_SUBSETS if subset in stats.get("choice", {})]
    if not rows:
        return []
    temperatures = list(rows[0][2]["right_gap"])
    lines = ["", "**Where does the teacher point on the answer?** At the answer's first token of a multiple-choice "
             "rollout: the student's probability of the right option, the teacher's, and the teacher's minus the "
             "student's at each teacher temperature (`model.loss.teacher_temperature`; the student at 1), and the "
             "teacher-minus-student entropy there. Training moves the student toward the teacher: below 0 for the "
             "failures shown a success, distillation pushes the right option down. Means over rollouts.", "",
             "| context | rollouts | student p(right) | teacher p(right) | "
             + " | ".join(f"teacher - student (T={t})" for t in temperatures) + " | share gap (T=1) | entropy gap |",
             "|---" * (6 + len(temperatures)) + "|"]
    for name, subset, stats in rows:
        lines.append(f"| {name} | {CHOICE_SUBSETS[subset]} ({stats['student_right']['n']}) | "
                     f"{_cell(stats['student_right'])} | {_cell(stats['teacher_right'][temperatures[0]])} | "
                     + " | ".join(_cell(stats["right_gap"][t]) for t in temperatures)
                     + f" | {_cell(stats['share_gap'][temperatures[0]])} | {_cell(stats['entropy_gap'])} |")
    return lines


# -- report -------------------------------------------------------------------------------------------------
def _cell(stat: Dict[str, Optional[float]]) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}] (n={stat['n']})"


def _label(variant: str) -> str:
    return f"{variant} (its own feedback: reveals its outcome)" if variant in OWN_LABEL else variant


def _coverage_table(summary: Dict[str, Any], meta: Dict[str, Any]) -> List[str]:
    """Per variant: how its peers were picked (``control_match``, for the controls), the rollouts it gave a context
    to, those 2S1F gave one to and it did not, and the prompts its AUC is defined on: a control that covers fewer
    prompts than the context it is compared with compares a subset."""
    rows = []
    for name, stats in summary["variants"].items():
        settings = {**(meta.get("peer_context") or {}), **((meta.get("variant_peers") or {}).get(name) or {})}
        control = CONTEXT_VARIANTS.get(name, {}).get("context") not in (None, "none")
        match = settings.get("control_match", "?") if control else "-"
        left_out = stats.get("left_out_of_2S1F")
        rows.append(f"| {_label(name)} | {match} | {stats['rollouts_scored']} | "
                    f"{'-' if left_out is None else left_out} | {stats.get('auc', {}).get('n', 0)} |")
    return ["", "**What each context covers.** Rollouts given a context, rollouts 2S1F gives one to that this one "
            "does not (a control with none to show them: no other prompt's rollouts, no success to fill the slots), "
            "and prompts with both outcomes its AUC is defined on. `control_match`: how a control picks its peers "
            "(`block` at random; `token` length-matched to 2S1F's, slot by slot).", "",
            "| context | control_match | rollouts with a context | left out of 2S1F's | prompts (AUC) |",
            "|---|---|---|---|---|", *rows]


def markdown_report(summary: Dict[str, Any], title: str, meta: Optional[Dict[str, Any]] = None) -> str:
    settings = ", ".join(f"{k}: {v}" for k, v in (meta or {}).items() if k not in ("wall_s", "variant_peers"))
    lines = [f"# {title}", "", *([f"Settings: {settings}.", ""] if settings else []),
             f"{summary['prompts']} prompts, {summary['rollouts']} rollouts, success rate "
             f"{summary['success_rate']:.3f}, {summary['mixed_prompts']} prompts with both a success and a failure"
             + (f"; self-BLEU-4 of a prompt's rollouts {_cell(summary['self_bleu'])} (1: all alike)"
                if summary.get("self_bleu", {}).get("n") else "") + ".",
             "", "Score = teacher mean log-prob minus student mean log-prob on the rollout's own tokens. Means over "
             "prompts with bootstrap 95% intervals (prompts resampled); n = prompts where the metric is defined.", "",
             "**Does the context separate successes from failures?** Prompts with both outcomes. No signal: AUC, "
             "pairwise accuracy and top-1 hit 0.5 (top-1: the prompt's success rate), correlations 0, Brier 0.25 or "
             "more (lower is better; the sigmoid variant, the reference's, reads sigmoid of the teacher's mean "
             "log-prob as the probability, at most 0.5). Ties in score count one half; Kendall is the reference's (Goodman-Kruskal "
             "gamma).", "",
             "| context | AUC | pairwise acc. | Spearman | Kendall (gamma) | point-biserial | Brier (min-max) "
             "| Brier (sigmoid of the mean log-prob) | top-1 hit |", "|---|---|---|---|---|---|---|---|---|"]
    if "student_confidence" in summary:  # reports written before it existed lack it
        lines.append("| *student's own log-prob (no teacher)* | "
                     + " | ".join(_cell(summary["student_confidence"][key]) if key in summary["student_confidence"]
                                  else "-" for key in SEPARATION) + " |")
    for name, stats in summary["variants"].items():
        lines.append(f"| {_label(name)} | " + " | ".join(_cell(stats[key]) if key in stats else "-"
                                                         for key in SEPARATION) + " |")
    lines += _coverage_table(summary, meta or {})
    controls = [c for c in LABEL_BLIND if any(f"auc_minus_{c}" in stats for stats in summary["variants"].values())]
    if controls:
        lines += ["", "**Does the context use the labels?** Each context's AUC minus a label-blind control's, paired by "
                  "prompt: random_peer shows rollouts of the group labelled at random, swapped_labels against their "
                  "labels. "
                  "Near 0: what moves the teacher is the peers' content, not whether they succeeded.", "",
                  "| context | " + " | ".join(f"AUC - {c}" for c in controls) + " |", "|---" * (len(controls) + 1) + "|"]
        for name, stats in summary["variants"].items():
            if name not in LABEL_BLIND:
                lines.append(f"| {name} | " + " | ".join(_cell(stats[f"auc_minus_{c}"]) for c in controls) + " |")
    if any(stats.get("auc_answer", {}).get("n") for stats in summary["variants"].values()):
        margins = [c for c in LABEL_BLIND if any(f"auc_answer_minus_{c}" in s for s in summary["variants"].values())]
        lines += ["", "**Where does the signal sit?** The same score on the answer span alone (where the verifier read "
                  "the answer: the letter, the last `\\boxed{}`, the program), on the end-of-turn token of finished "
                  "rollouts, and on every other token; prompts with both outcomes among the rollouts that have the "
                  "part. An answer-span AUC above the whole response's is a signal the mean over all tokens "
                  "dilutes.", "",
                  "| context | AUC (whole) | AUC (answer span) | AUC (rest) | AUC (end of turn) | "
                  + "".join(f"answer - {c} | " for c in margins), "|---" * (5 + len(margins)) + "|"]
        rows = ([("*student's own log-prob (no teacher)*", summary["student_confidence"])]
                if "auc_answer" in summary.get("student_confidence", {}) else [])
        for label, stats in rows + list(summary["variants"].items()):
            cells = [_cell(stats[key]) for key in ("auc",) + PART_AUCS]
            cells += [_cell(stats[f"auc_answer_minus_{c}"]) if f"auc_answer_minus_{c}" in stats else "-"
                      for c in margins]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += _choice_table(summary)
    lines += ["", "**How far is the teacher from the student?** All prompts. Gap = student minus teacher mean "
              "log-prob on the student's tokens, a per-token estimate of KL(student || teacher) at these weights; "
              "entropy gap = teacher minus student mean entropy (nats).", "",
              "| context | score (success) | score (failure) | student-to-teacher gap | entropy gap |",
              "|---|---|---|---|---|"]
    for name, stats in summary["variants"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(stats[key]) for key in ("success_score", "failure_score", "gap",
                                                                                "entropy_gap")) + " |")
    return "\n".join(lines) + "\n"


def plot_report(summary: Dict[str, Any], path: Path, title: str) -> None:
    """AUC (of the whole response, and of the answer span alone) and entropy gap per context variant, with their
    intervals; the AUC of the student's own log-prob as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["variants"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, keys, reference, label in ((axes[0], ("auc", "auc_answer"), 0.5, "AUC (success vs failure)"),
                                       (axes[1], ("entropy_gap",), 0.0, "teacher - student entropy (nats)")):
        for offset, key in zip((0.0, 0.2), keys):
            stats = [summary["variants"][n].get(key, {"mean": None}) for n in names]
            xs = [i for i, s in enumerate(stats) if s["mean"] is not None]
            means = [stats[i]["mean"] for i in xs]
            errors = [[stats[i]["mean"] - stats[i]["low"] for i in xs],
                      [stats[i]["high"] - stats[i]["mean"] for i in xs]]
            ax.errorbar([x + offset for x in xs], means, yerr=errors, fmt="o" if offset == 0 else "s", capsize=4,
                        label={"auc": "whole response", "auc_answer": "answer span"}.get(key))
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1)
        confidence = summary.get("student_confidence", {}).get(keys[0])
        if confidence and confidence["mean"] is not None:  # the bar a teacher's score must clear
            ax.axhspan(confidence["low"], confidence["high"], color="tab:orange", alpha=0.15,
                       label="student's own log-prob (95% interval)")
            ax.axhline(confidence["mean"], color="tab:orange", linewidth=1)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower left")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=40, ha="right")
        ax.set_ylabel(label)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(summary: Dict[str, Any], records: Sequence[Dict[str, Any]], output_dir: str,
                 meta: Dict[str, Any]) -> Path:
    """``analysis.json`` (summary, settings and every record), ``analysis.md`` and ``analysis.png``."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    title = f"Teacher-signal analysis: {meta.get('student', 'student')}"
    (folder / "analysis.json").write_text(json.dumps({"meta": meta, "summary": summary, "records": list(records)},
                                                     indent=1))
    (folder / "analysis.md").write_text(markdown_report(summary, title, meta))
    plot_report(summary, folder / "analysis.png", title)
    return folder


SAME_SETTINGS = ("student", "ckpt_path", "dtype", "group_size", "temperature", "top_p", "top_k", "max_new_tokens",
                 "max_peer_tokens", "verifier", "teacher", "teacher_path", "teacher_mix", "peer_context", "precision",
                 "seed")
"""Settings that reports must share to be summarised together: the same model, sampled and scored the same way
(``score_settings``, plus the checkpoint, the precision and the seed)."""


def resummarize(reports: Sequence[str], output_dir: Optional[str] = None, samples: int = 2000) -> Path:
    """Recompute the summary of written ``analysis.json`` files from their records (the same rollouts and scores),
    with this version's metrics, and write one report (in ``output_dir``, or beside the first). Several reports (an
    analysis run in parts: the validation split and held-out training prompts, or several jobs) are joined when
    they share their settings and no prompt; the variants are those every report scored."""
    reports = [reports] if isinstance(reports, (str, Path)) else list(reports)
    saved = [json.loads(Path(report).read_text()) for report in reports]
    meta = dict(saved[0]["meta"])
    variants = [v for v in saved[0]["summary"]["variants"] if all(v in d["summary"]["variants"] for d in saved)]

    def shown(data: Dict[str, Any], variant: str) -> Optional[Dict[str, Any]]:  # what a variant showed, if recorded
        return (data["meta"].get("variant_peers") or {}).get(variant)

    for report, other in zip(reports[1:], saved[1:]):
        differ = [f"{key} ({other['meta'].get(key)!r}, not {meta.get(key)!r})" for key in SAME_SETTINGS
                  if other["meta"].get(key) != meta.get(key)]
        differ += [f"{name}'s peer settings ({shown(other, name)!r}, not {shown(saved[0], name)!r})"
                   for name in variants if shown(other, name) != shown(saved[0], name)]
        if differ:
            raise ValueError(f"{report}: its {', '.join(differ)} differ from {reports[0]}'s; reports are joined only "
                             "when their rollouts come from the same model and settings")
    seen: Dict[str, str] = {}
    for report, data in zip(reports, saved):
        for prompt in {r["prompt"] for r in data["records"]}:
            if prompt in seen:
                raise ValueError(f"prompt {prompt} is in both {seen[prompt]} and {report}; a prompt counts once")
            seen[prompt] = report
    records = [record for data in saved for record in data["records"]]
    if len(saved) > 1:
        for key in {key for data in saved for key in data["meta"]} - set(SAME_SETTINGS) - {"wall_s", "variant_peers"}:
            values = [data["meta"].get(key) for data in saved]
            if any(value != values[0] for value in values):  # where the parts differ (prompts, checkpoint): each
                meta[key] = values
        meta["wall_s"] = sum(data["meta"].get("wall_s", 0.0) for data in saved)
        if "variant_peers" in meta:
            meta["variant_peers"] = {name: shown(saved[0], name) for name in variants}
        meta["joined"] = [str(report) for report in reports]
    summary = summarize(records, variants, samples, seed=meta.get("seed", 0))
    return write_report(summary, records, output_dir or str(Path(reports[0]).parent), meta)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=resummarize.__doc__.split(".")[0])
    parser.add_argument("reports", nargs="+", help="analysis.json files written by mopd analyze (several are joined)")
    parser.add_argument("--output-dir", help="where to write the new report (default: beside the first one)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the 95%% intervals")
    arguments = parser.parse_args()
    try:
        folder = resummarize(arguments.reports, arguments.output_dir, arguments.bootstrap)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    print((folder / "analysis.md").read_text())
