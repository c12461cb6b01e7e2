"""Methods: each ``model.method`` is a list of weighted objectives plus a preset of the peer settings.

- ``mopd``: distillation from the teacher under the peer context (``model.peers``), optionally blended with
  GRPO (``model.grpo.weight``, the lambda of ``lambda * GRPO + (1 - lambda) * MOPD``);
- ``opd``: the SDPO-style self-teacher: the same, with one success peer and no failure (1S);
- ``teacher_opd``: classic on-policy distillation: a frozen or external teacher that sees the plain prompt;
- ``grpo``: group-relative advantages with the clipped policy-gradient objective, no teacher pass;
- ``sft_success``: token NLL on the verified successes (rejection-sampling fine-tuning);
- ``dpo``, ``simpo``: the preference baselines on each group's pairs of rollouts with different rewards.

All of them sample, verify, log and update the same way, so runs compare line by line. Switching methods is one
setting: what a config sets for another method (a GRPO blend, an EMA teacher, peers) is adapted or left unused,
and each such change is logged.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import List, Literal, Optional, Sequence, Tuple

from .config import ConfigError, GRPOConfig, LossConfig, PeerConfig, PreferenceConfig, TeacherConfig
from .objectives import ClippedPolicyGradient, Distillation, PairwisePreference, SuccessLikelihood

log = logging.getLogger(__name__)

MethodName = Literal["mopd", "opd", "teacher_opd", "grpo", "sft_success", "dpo", "simpo"]
METHODS = ("mopd", "opd", "teacher_opd", "grpo", "sft_success", "dpo", "simpo")
DISTILLATION_METHODS = ("mopd", "opd", "teacher_opd")


@dataclass
class Method:
    """The objectives of one method, each with its weight, and the peer and teacher settings it runs with."""

    name: str
    objectives: List[Tuple[float, object]]
    peers: PeerConfig
    teacher: TeacherConfig

    @property
    def needs_teacher(self) -> bool:
        return any(objective.needs_teacher for _, objective in self.objectives)

    @property
    def needs_advantages(self) -> bool:
        return any(isinstance(objective, ClippedPolicyGradient) for _, objective in self.objectives)

    @property
    def needs_reference(self) -> bool:
        """Whether an objective reads the initial student's log-probabilities (GRPO's KL term, DPO)."""
        return any(objective.needs_reference for _, objective in self.objectives)

    @property
    def pairwise(self) -> Optional[PairwisePreference]:
        """The preference objective (dpo, simpo), whose pairs are scored before the update."""
        return next((o for _, o in self.objectives if isinstance(o, PairwisePreference)), None)

    @property
    def needs_old_logp(self) -> bool:
        return any(objective.needs_old_logp for _, objective in self.objectives)

    @property
    def distils_answers_only(self) -> bool:
        """Whether the distillation reads only the answer's tokens (``model.loss.tokens: answer``)."""
        return any(isinstance(o, Distillation) and o.config.tokens == "answer" for _, o in self.objectives)

    @property
    def contrasts_labels(self) -> bool:
        """Whether the teacher also scores each rollout under its peers with their labels swapped
        (``model.loss.estimator: label_contrast``)."""
        return any(isinstance(o, Distillation) and o.config.estimator == "label_contrast" for _, o in self.objectives)

    def learns_from(self, rewards: Sequence[float], success: Sequence[bool]) -> bool:
        """Whether a group with these rewards gives any of the method's objectives a signal (dynamic sampling)."""
        return any(objective.learns_from(rewards, success) for _, objective in self.objectives)


def build_method(name: str, peers: PeerConfig, teacher: TeacherConfig, loss: LossConfig,
                 grpo: GRPOConfig, preference: PreferenceConfig = PreferenceConfig()) -> Method:
    """The objectives and peer preset of ``model.method``, after checking that the settings fit it."""
    if name not in METHODS:
        raise ConfigError(f"model.method is {name!r}; expected one of {', '.join(METHODS)}")
    if name not in DISTILLATION_METHODS:
        if grpo.weight != 0:
            log.info("model.method %s trains its own objective alone: model.grpo.weight %g (a blend into "
                     "distillation) is not used", name, grpo.weight)
        objective = {"grpo": lambda: ClippedPolicyGradient(grpo), "sft_success": SuccessLikelihood,
                     "dpo": lambda: PairwisePreference("dpo", preference),
                     "simpo": lambda: PairwisePreference("simpo", preference)}[name]()
        return Method(name, [(1.0, objective)], peers, teacher)
    if name == "opd":
        peers = _preset(peers, "opd", "model.peers", n_success=1, n_failure=0, context="peers")
    elif name == "teacher_opd":  # a separate teacher on the plain prompt: the initial weights unless one is named
        if teacher.kind not in ("frozen", "external"):
            teacher = _preset(teacher, "teacher_opd", "model.teacher", kind="frozen")
        peers = _preset(peers, "teacher_opd", "model.peers", context="none")
    if loss.estimator == "label_contrast" and peers.context == "none":
        raise ConfigError(f"model.loss.estimator: label_contrast contrasts the teacher under the peers' labels with "
                          f"the same peers relabelled; model.method {name} with model.peers.context none shows the "
                          "teacher no peers. Use estimator sampled_token, or a method with peers (mopd, opd)")
    objectives = [(1.0 - grpo.weight, Distillation(loss)), (grpo.weight, ClippedPolicyGradient(grpo))]
    return Method(name, [(w, o) for w, o in objectives if w > 0], peers, teacher)


def _preset(settings, method: str, prefix: str, **values):
    changed = {k: v for k, v in values.items() if getattr(settings, k) != v}
    if changed:
        log.info("model.method %s sets %s %s", method, prefix, ", ".join(f"{k}={v}" for k, v in changed.items()))
    return dataclasses.replace(settings, **values)
