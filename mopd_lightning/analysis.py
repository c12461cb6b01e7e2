"""Teacher-signal analysis: does a peer context tell the teacher which rollouts of a group are right?

For every rollout and every context variant, the teacher's *score* is the mean log-probability of the
rollout's tokens under ``[teacher prompt ; response]`` minus the student's under ``[prompt ; response]``. MOPD
can only help when that score separates successes from failures: per prompt holding both, we measure the AUC
of the score against success, the pairwise accuracy (share of success-failure pairs ranked right) and the
Spearman correlation with the reward; and, per variant, the teacher-minus-student entropy gap (a context that
raises the teacher's entropy pushes the student's entropy up). Prompt means with bootstrap 95% intervals.

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

from .config import PeerConfig
from .loss import entropy_and_logprobs
from .peers import build_teacher_contexts
from .scoring import output_weight, score_rollouts

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
}
"""Context variants: the paper's peer mixes and its controls (the controls at the 2S1F size)."""


def variant_peers(base: PeerConfig, name: str) -> PeerConfig:
    """``base`` (templates, budgets) with the peer mix of variant ``name``; failures always included, no gate."""
    if name not in CONTEXT_VARIANTS:
        raise ValueError(f"unknown context variant {name!r}; known: {', '.join(CONTEXT_VARIANTS)}")
    settings = dict(n_success=base.n_success, n_failure=base.n_failure, context="peers", failure_when="always",
                    require_success=False)
    settings.update(CONTEXT_VARIANTS[name])
    return dataclasses.replace(base, **settings)


def _mean_logp_and_entropy(hidden: Dict[int, torch.Tensor], weight: torch.Tensor,
                           response_ids: Sequence[Sequence[int]]) -> Dict[int, tuple[float, float]]:
    out = {}
    for r, h in hidden.items():
        entropy, logp = entropy_and_logprobs(h, weight, torch.tensor(response_ids[r], device=h.device))
        out[r] = (float(logp.mean()), float(entropy.mean()))
    return out


@torch.no_grad()
def teacher_signal_records(module, batch, variants: Sequence[str]) -> List[Dict[str, Any]]:
    """Sample and verify groups for ``batch``, then score every rollout under every context variant.

    One record per rollout: its prompt, reward, success, the student's mean log-prob and entropy on its own
    tokens, and per variant the teacher's (None where the variant gives that rollout no context).
    """
    started = time.monotonic()
    rollouts = module.sample(batch, "analyze", module.sampling.group_size, module.sampling.temperature)
    module.verify(batch, rollouts)
    log.info("analysis: %d rollouts of %d prompts sampled and verified (%.0f s)", len(rollouts), len(batch),
             time.monotonic() - started)
    lengths = {r: len(ids) for r, ids in enumerate(rollouts.response_ids)}
    pad, budget, packed = module.tokenizer.pad_token_id, module.optim.max_tokens_per_micro_batch, module.optim.packed
    plain = {r: rollouts.prompt_ids[r] + ids for r, ids in enumerate(rollouts.response_ids) if ids}
    student = _mean_logp_and_entropy(score_rollouts(module.student, plain, lengths, pad, budget, packed),
                                     output_weight(module.student), rollouts.response_ids)
    teacher = module.scoring_teacher
    per_variant = {}
    for name in variants:
        contexts = build_teacher_contexts(batch, rollouts, module.tokenizer, variant_peers(module.peers, name),
                                          seed_key=f"{module.seed}:analyze")
        sequences = {r: c.prompt_ids + rollouts.response_ids[r] for r, c in enumerate(contexts)
                     if c.active and r in plain}
        per_variant[name] = _mean_logp_and_entropy(score_rollouts(teacher, sequences, lengths, pad, budget, packed),
                                                   output_weight(teacher), rollouts.response_ids)
        log.info("analysis: context %s scored (%d of %d; %.0f s)", name, len(per_variant), len(variants),
                 time.monotonic() - started)
    records = []
    for r in plain:
        example = batch[rollouts.group[r]]
        records.append({
            "prompt": example.id, "reward": rollouts.reward[r], "success": rollouts.success[r],
            "response_len": lengths[r], "student_logp": student[r][0], "student_entropy": student[r][1],
            "teacher": {name: ({"logp": scores[r][0], "entropy": scores[r][1]} if r in scores else None)
                        for name, scores in per_variant.items()},
        })
    return records


# -- statistics ---------------------------------------------------------------------------------------------
def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(score of a success > score of a failure), ties counting one half (Mann-Whitney)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def pairwise_accuracy(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Share of success-failure pairs where the success scores strictly higher."""
    return sum(p > n for p in positive for n in negative) / (len(positive) * len(negative))


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
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def bootstrap_mean(values: Sequence[float], samples: int = 1000, seed: int = 0) -> Dict[str, Optional[float]]:
    """Mean with a percentile bootstrap 95% interval (resampling the values, e.g. prompts)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(samples))
    low, high = means[int(0.025 * (samples - 1))], means[int(0.975 * (samples - 1))]
    return {"mean": sum(values) / n, "low": low, "high": high, "n": n}


def summarize(records: Sequence[Dict[str, Any]], variants: Sequence[str], samples: int = 1000,
              seed: int = 0) -> Dict[str, Any]:
    """Per variant: AUC, pairwise accuracy and Spearman over prompts with both outcomes; score and entropy gap
    over all prompts (each prompt's mean first, so every prompt weighs the same)."""
    prompts: Dict[str, List[Dict[str, Any]]] = {}
    for record in records:
        prompts.setdefault(record["prompt"], []).append(record)
    summary = {"prompts": len(prompts), "rollouts": len(records),
               "success_rate": sum(r["success"] for r in records) / max(len(records), 1),
               "mixed_prompts": sum(len({r["success"] for r in group}) == 2 for group in prompts.values()),
               "variants": {}}
    for name in variants:
        per_prompt = {"auc": [], "pairwise_accuracy": [], "spearman": [], "score": [], "entropy_gap": [],
                      "success_score": [], "failure_score": []}
        scored_rollouts = 0
        for group in prompts.values():
            scored = [(r, r["teacher"][name]["logp"] - r["student_logp"],
                       r["teacher"][name]["entropy"] - r["student_entropy"]) for r in group if r["teacher"].get(name)]
            if not scored:
                continue
            scored_rollouts += len(scored)
            per_prompt["score"].append(sum(s for _, s, _ in scored) / len(scored))
            per_prompt["entropy_gap"].append(sum(e for _, _, e in scored) / len(scored))
            positive = [s for r, s, _ in scored if r["success"]]
            negative = [s for r, s, _ in scored if not r["success"]]
            if positive:
                per_prompt["success_score"].append(sum(positive) / len(positive))
            if negative:
                per_prompt["failure_score"].append(sum(negative) / len(negative))
            if positive and negative:
                per_prompt["auc"].append(auc(positive, negative))
                per_prompt["pairwise_accuracy"].append(pairwise_accuracy(positive, negative))
                rho = spearman([s for _, s, _ in scored], [r["reward"] for r, _, _ in scored])
                if rho is not None:
                    per_prompt["spearman"].append(rho)
        summary["variants"][name] = {"rollouts_scored": scored_rollouts}
        summary["variants"][name].update({key: bootstrap_mean(values, samples, seed) for key, values in per_prompt.items()})
    return summary


# -- report -------------------------------------------------------------------------------------------------
def _cell(stat: Dict[str, Optional[float]]) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}] (n={stat['n']})"


def markdown_report(summary: Dict[str, Any], title: str, meta: Optional[Dict[str, Any]] = None) -> str:
    settings = ", ".join(f"{k}: {v}" for k, v in (meta or {}).items() if k != "wall_s")
    lines = [f"# {title}", "", *([f"Settings: {settings}.", ""] if settings else []),
             f"{summary['prompts']} prompts, {summary['rollouts']} rollouts, success rate "
             f"{summary['success_rate']:.3f}, {summary['mixed_prompts']} prompts with both a success and a failure.",
             "", "Score = teacher mean log-prob minus student mean log-prob on the rollout's own tokens. AUC, pairwise "
             "accuracy and Spearman over prompts with both outcomes (0.5 / 0.5 / 0 = no signal); means with "
             "bootstrap 95% intervals over prompts.", "",
             "| context | AUC | pairwise acc. | Spearman | score (success) | score (failure) | entropy gap |",
             "|---|---|---|---|---|---|---|"]
    for name, stats in summary["variants"].items():
        lines.append(f"| {name} | {_cell(stats['auc'])} | {_cell(stats['pairwise_accuracy'])} | "
                     f"{_cell(stats['spearman'])} | {_cell(stats['success_score'])} | {_cell(stats['failure_score'])} "
                     f"| {_cell(stats['entropy_gap'])} |")
    return "\n".join(lines) + "\n"


def plot_report(summary: Dict[str, Any], path: Path, title: str) -> None:
    """AUC and entropy gap per context variant, with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["variants"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, reference, label in ((axes[0], "auc", 0.5, "AUC (success vs failure)"),
                                      (axes[1], "entropy_gap", 0.0, "teacher - student entropy (nats)")):
        stats = [summary["variants"][n][key] for n in names]
        xs = [i for i, s in enumerate(stats) if s["mean"] is not None]
        means = [stats[i]["mean"] for i in xs]
        errors = [[stats[i]["mean"] - stats[i]["low"] for i in xs], [stats[i]["high"] - stats[i]["mean"] for i in xs]]
        ax.errorbar(xs, means, yerr=errors, fmt="o", capsize=4)
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1)
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
