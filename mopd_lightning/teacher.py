"""The teacher's arithmetic: frozen copies, the EMA step, and the trust region's mixture of the initial model and the
live student (which weights play the teacher is decided in ``roles.py``)."""

from __future__ import annotations

from typing import Dict, Tuple

import torch


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` as a teacher: no gradients, eval mode (no dropout)."""
    model.requires_grad_(False)
    return model.eval()


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
    the mixture as it reads any teacher. The head is a new tensor: later updates do not move it. Where both sides
    share one head (a LoRA student's frozen base head), the mixture is that of the hidden states, on that head."""
    if initial_head.shape == student_head.shape and initial_head.data_ptr() == student_head.data_ptr():
        return {r: (1 - mix) * h + mix * student_hidden[r].to(h.dtype) for r, h in initial_hidden.items()}, initial_head
    hidden = {r: torch.cat([(1 - mix) * h, mix * student_hidden[r].to(h.dtype)], -1) for r, h in initial_hidden.items()}
    return hidden, torch.cat([initial_head.detach(), student_head.detach().to(initial_head.dtype)], -1)
