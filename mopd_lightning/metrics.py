"""What is logged: validation metrics over k samples per prompt (torchmetrics, synchronised across ranks) and
the per-step training metrics."""

from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
from torchmetrics import Metric

from .analysis import score, summarize


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: ``1 - C(n - c, k) / C(n, k)``."""
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


class PassAtK(Metric):
    """Mean over prompts of pass@k, from each prompt's number of samples and of correct ones."""

    full_state_update = False

    def __init__(self, k: int, **kwargs):
        super().__init__(**kwargs)
        self.k = k
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prompts", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, num_samples: torch.Tensor, num_correct: torch.Tensor) -> None:
        for n, c in zip(num_samples.tolist(), num_correct.tolist()):
            self.total += pass_at_k(int(n), int(c), self.k)
            self.prompts += 1

    def compute(self) -> torch.Tensor:
        return (self.total / self.prompts.clamp(min=1)).float()


def success_coverage(rollouts, contexts) -> Dict[str, float]:
    """Successes that no other success can teach: the only success of their group (share of all rollouts), and
    successes left without any context, hence without distillation signal (share of the successes)."""
    successes = [r for r, ok in enumerate(rollouts.success) if ok]
    groups = rollouts.groups
    lone = [r for r in successes if sum(rollouts.success[j] for j in groups[rollouts.group[r]]) == 1]
    silent = [r for r in successes if not contexts[r].active]
    return {"train/lone_success_fraction": len(lone) / len(rollouts),
            "train/success_without_signal_fraction": len(silent) / max(len(successes), 1)}


def teacher_signal_metrics(rollouts, probes: Dict[str, Dict[int, Dict[str, Any]]]) -> Dict[str, float]:
    """What the analysis would say of this step's own teacher contexts, from the step's own passes: the AUC of the
    teacher-minus-student score over the step's prompts with both outcomes (whole response and answer span), the
    teacher-minus-student entropy on the student's tokens, and the share of successes (and of failures) whose
    tokens the teacher finds likelier than the student does, i.e. that distillation pushes up. A teacher flatter
    than the student (entropy gap > 0, successes not favoured) is a collapse coming (README, "Logged metrics").

    With ``label_contrast``, ``train/contrast_auc`` (and ``_answer``) are the same AUCs of the contrast's score, the
    teacher's mean log-prob under the true labels minus under the swapped ones."""
    records = _records(rollouts, probes["student"], probes["teacher"])
    if not records:
        return {}
    step = summarize(records, ["step"], samples=1)["variants"]["step"]
    metrics = {"train/teacher_entropy_gap": step["entropy_gap"]["mean"],
               "train/teacher_auc_prompts": float(step["auc"]["n"])}
    summaries = [(step, "train/teacher")]
    if probes.get("contrast"):
        contrast = _records(rollouts, probes["contrast"], probes["teacher"])
        summaries.append((summarize(contrast, ["step"], samples=1)["variants"]["step"], "train/contrast"))
    for summary, prefix in summaries:
        for key in ("auc", "auc_answer"):
            if summary[key]["n"]:
                metrics[f"{prefix}_{key}"] = summary[key]["mean"]
    for outcome, name in ((True, "success"), (False, "failure")):
        scores = [score(record, "step") for record in records if record["success"] == outcome]
        if scores:
            metrics[f"train/teacher_favours_{name}_fraction"] = sum(s > 0 for s in scores) / len(scores)
    return metrics


def _records(rollouts, baseline: Dict[int, Dict[str, Any]], teacher: Dict[int, Dict[str, Any]]
             ) -> List[Dict[str, Any]]:
    """The analysis's records of the step's taught rollouts, each scored as ``teacher`` minus ``baseline`` (the
    student, or the teacher under swapped labels)."""
    return [{"prompt": rollouts.group[r], "reward": rollouts.reward[r], "success": rollouts.success[r],
             "student_logp": baseline[r]["logp"], "student_entropy": baseline[r]["entropy"],
             "student_parts": baseline[r]["parts"], "teacher": {"step": teacher[r]}} for r in sorted(teacher)]


def training_metrics(rollouts, signal, names: List[str], weights: List[float], stats: Dict[str, Any],
                     loss_sums: List[float], timer, skipped_steps: int, feedback_in_context: bool) -> Dict[str, float]:
    """The numbers logged after every training step, the same for every method (so runs compare line by line).

    ``loss_sums`` are each update's token sums per objective over all ranks; everything else is this rank's. With
    several updates per batch (``optim.updates_per_batch``), ``train/loss`` and ``train/grad_norm`` are the first,
    on-policy update's (comparable across reuse settings; the norm before clipping), and ``*_mean_over_updates``
    the means over all updates (over those not skipped, for the norm). The entropy is the student's (temperature 1)
    on its own rollouts' tokens, recorded while sampling (``hf``) or, with a separate sampling engine, measured on
    the trained rollouts before the update, beside the engine's log-prob gap.
    """
    per_update = [[total / max(n, 1.0) for total, n in zip(sums, stats["normalisers"])] for sums in loss_sums]
    losses = per_update[0]
    response_tokens = sum(map(len, rollouts.response_ids))
    metrics = {
        "train/reward": sum(rollouts.reward) / len(rollouts),
        "train/success_rate": sum(rollouts.success) / len(rollouts),
        "train/mixed_group_fraction": rollouts.mixed_group_fraction,
        "train/active_fraction": stats["forward_rows"] / len(rollouts),
        "train/padded_fraction": stats["padded_fraction"],
        "train/loss": sum(w * loss for w, loss in zip(weights, losses)),
        "train/entropy": stats.get("entropy", sum(rollouts.entropy) / max(response_tokens, 1)),
        "train/response_len": response_tokens / len(rollouts),
        "train/finished_fraction": sum(rollouts.finished) / len(rollouts),
        "train/skipped_steps": float(skipped_steps),
        "time/step_s": timer.total,
        "throughput/tokens_per_s": response_tokens / max(timer.total, 1e-9),
        **{f"time/{name}_s": seconds for name, seconds in timer.seconds.items()},
    }
    if len(names) > 1:
        metrics.update({f"train/loss_{name}": loss for name, loss in zip(names, losses)})
    stepped = [norm for norm in stats["grad_norms"] if norm is not None]
    if stats["grad_norms"][0] is not None:
        metrics["train/grad_norm"] = stats["grad_norms"][0]
    if len(per_update) > 1:
        metrics["train/loss_mean_over_updates"] = sum(sum(w * loss for w, loss in zip(weights, update))
                                                      for update in per_update) / len(per_update)
        if stepped:
            metrics["train/grad_norm_mean_over_updates"] = sum(stepped) / len(stepped)
    if signal.contexts is not None:
        contexts = signal.contexts
        active = [c for c in contexts if c.active]
        prompt_lengths = [len(c.prompt_ids) for c in active] or [0]
        peers_total = sum(len(c.peers) for c in contexts)
        metrics.update({
            "train/peers_per_context": peers_total / len(contexts),
            "train/teacher_prompt_len_mean": sum(prompt_lengths) / len(prompt_lengths),
            "train/teacher_prompt_len_max": float(max(prompt_lengths)),
            "train/peer_truncation_fraction": sum(c.truncated_peers for c in contexts) / max(peers_total, 1),
            "train/feedback_in_context": float(feedback_in_context),
            "train/summaries_per_context": sum(len(c.summarized) for c in contexts) / len(contexts),
            "train/summary_fallback_fraction": (sum(c.summary_fallbacks for c in contexts)
                                                / max(sum(len(c.summarized) for c in contexts), 1)),
            **success_coverage(rollouts, contexts),
            **teacher_signal_metrics(rollouts, stats["teacher_probes"]),
        })
    if stats.get("self_bleu") is not None:  # how alike a group's rollouts are (collapse: towards 1)
        metrics["train/self_bleu"] = stats["self_bleu"]
    if signal.pairs is not None:
        metrics.update({"train/preference_pairs": float(signal.pairs.count),
                        "train/preference_accuracy": signal.pairs.accuracy,
                        "train/preference_margin": signal.pairs.margin})
    if signal.advantages is not None:
        metrics["train/advantage_abs_mean"] = sum(map(abs, signal.advantages)) / len(signal.advantages)
    metrics.update({f"train/{key}": value for key, value in stats.items() if key.startswith(("engine_", "dynamic_"))})
    return metrics
