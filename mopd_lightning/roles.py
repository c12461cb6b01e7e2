"""Who plays which role: the weights that the student, the teacher and the initial student run with.

Three settings decide it (the method, ``model.teacher.kind`` and LoRA), once, into one small table that every pass
reads (sampling, the teacher and reference passes, the EMA step, the analysis), so that no combination of the three
takes a path of its own. The roles:

- ``student``: the weights trained (with LoRA, the adapter ``default``);
- ``teacher``: what scores the rollouts under the peer context. A method without a teacher (``grpo``,
  ``sft_success``) gets the live student, ``self``, which is what its analysis reports. ``trust_region`` is two
  weights, the initial student's and the live student's, whose logits are mixed;
- ``initial``: the student as it started: the frozen teacher, trust region's other side and GRPO's reference, one
  frozen copy for all three (with LoRA, the base with its adapters switched off: no copy at all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Tuple

from .lora import STUDENT, TEACHER

Module = Literal["student", "ema", "initial", "external"]


@dataclass(frozen=True)
class Weights:
    """Which model's parameters a pass runs with: the student, the EMA copy, the frozen initial copy or the external
    checkpoint; and, on a LoRA student, the adapter switched on (None: its base, adapters off)."""

    module: Module
    adapter: Optional[str] = None


@dataclass(frozen=True)
class Roles:
    teacher_kind: str  # as logs and reports name the teacher
    student: Weights
    teacher: Tuple[Weights, ...]  # one; trust_region: (initial, live student), mixed
    initial: Optional[Weights]  # None when no pass needs the initial student

    @property
    def copies(self) -> set:
        """The models to build beside the student."""
        used = self.teacher + ((self.initial,) if self.initial else ())
        return {weights.module for weights in used} - {"student"}


def resolve_roles(teacher_kind: str, lora: bool, needs_teacher: bool, needs_reference: bool) -> Roles:
    """The roles for a method that needs a teacher (or not) and GRPO's reference (or not)."""
    kind = teacher_kind if needs_teacher else "self"
    student = Weights("student", STUDENT if lora else None)
    initial = Weights("student", None) if lora else Weights("initial")
    teacher = {"self": (student,),
               "ema": (Weights("student", TEACHER) if lora else Weights("ema"),),
               "frozen": (initial,),
               "external": (Weights("external"),),
               "trust_region": (initial, student)}[kind]
    needs_initial = needs_reference or kind == "trust_region"
    return Roles(kind, student, teacher, initial if needs_initial else None)
