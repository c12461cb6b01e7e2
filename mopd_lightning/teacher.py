"""The teacher that scores rollouts under peer contexts: an EMA copy, the live student, a frozen copy, a trust
region between the initial model and the live student, or an external checkpoint."""

from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple

import torch

from .config import TeacherConfig


def make_teacher(student: torch.nn.Module, config: TeacherConfig, load_external) -> Optional[torch.nn.Module]:
    """A separate teacher module (for ``trust_region``, the initial model it mixes with the student), or None when the
    teacher is the live student (``self``)."""
    if config.kind == "self":
        return None
    teacher = load_external(config.path) if config.kind == "external" else copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, rate: float) -> None:
    """``teacher <- (1 - rate) * teacher + rate * student``, parameter by parameter (buffers copied)."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s.detach().to(t.dtype), rate)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


def trust_region(initial_hidden: Dict[int, torch.Tensor], student_hidden: Dict[int, torch.Tensor],
                 initial_head: torch.Tensor, student_head: torch.Tensor, mix: float
                 ) -> Tuple[Dict[int, torch.Tensor], torch.Tensor]:
    """Hidden states and head whose logits are ``(1 - mix) * initial + mix * student``: both models' hidden states
    side by side (scaled) against both heads side by side, so that every loss path, the fused one included, reads
    the mixture as it reads any teacher. The head is a new tensor: later updates do not move it."""
    hidden = {r: torch.cat([(1 - mix) * h, mix * student_hidden[r].to(h.dtype)], -1) for r, h in initial_hidden.items()}
    return hidden, torch.cat([initial_head.detach(), student_head.detach().to(initial_head.dtype)], -1)
