"""The teacher that scores rollouts under peer contexts: an EMA copy, the live student, a frozen copy, or
an external checkpoint."""

from __future__ import annotations

import copy
from typing import Optional

import torch

from .config import TeacherConfig


def make_teacher(student: torch.nn.Module, config: TeacherConfig, load_external) -> Optional[torch.nn.Module]:
    """A separate teacher module, or None when the teacher is the live student (``self``)."""
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
