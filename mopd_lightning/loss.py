"""The token-level distillation loss between student and teacher next-token distributions.

Per token, with S and T the student and teacher distributions (both logits divided by ``temperature``):
``alpha = 0`` is forward KL(T || S), ``alpha = 1`` reverse KL(S || T), and in between the generalized
Jensen-Shannon divergence ``(1 - alpha) KL(S || M) + alpha KL(T || M)`` with ``M = (1 - alpha) S + alpha T``.
With ``topk`` the comparison is over the student's k most likely tokens (plus a tail bucket with the rest).
This module is the plain-PyTorch form; ``distillation_loss`` is the one seam the fused kernels replace.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .config import LossConfig


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row from log-probabilities, with 0 log 0 = 0 (and -inf entries of P ignored)."""
    p = p_log.exp()
    log_ratio = torch.where(p > 0, p_log - q_log, torch.zeros_like(p))  # where() first: no NaN gradients
    return (p * log_ratio).sum(-1)


def _topk_log_probs(student_log: torch.Tensor, teacher_log: torch.Tensor, k: int, tail: bool):
    index = student_log.detach().topk(min(k, student_log.shape[-1]), dim=-1).indices
    s, t = student_log.gather(-1, index), teacher_log.gather(-1, index)
    if not tail:
        return s.log_softmax(-1), t.log_softmax(-1)

    def with_tail(x):
        rest = torch.log1p(-x.exp().sum(-1, keepdim=True).clamp(max=1.0 - 1e-7))  # log(1 - sum p_topk)
        return torch.cat([x, rest], dim=-1)

    return with_tail(s), with_tail(t)


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float = 0.5,
                     temperature: float = 1.0, topk: Optional[int] = None, tail: bool = True) -> torch.Tensor:
    """Per-token divergence ``(N,)`` in float32 between ``(N, V)`` student and teacher logits."""
    student_log = (student_logits.float() / temperature).log_softmax(-1)
    teacher_log = (teacher_logits.float().detach() / temperature).log_softmax(-1)
    if topk is not None:
        student_log, teacher_log = _topk_log_probs(student_log, teacher_log, topk, tail)
    if alpha == 0:
        return _kl(teacher_log, student_log)
    if alpha == 1:
        return _kl(student_log, teacher_log)
    mixture_log = torch.logsumexp(torch.stack([student_log + math.log(1 - alpha), teacher_log + math.log(alpha)]), 0)
    return (1 - alpha) * _kl(student_log, mixture_log) + alpha * _kl(teacher_log, mixture_log)


def distillation_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                      teacher_weight: torch.Tensor, weights: torch.Tensor, config: LossConfig
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sum over tokens of ``weights * divergence``, and the summed student entropy (detached) of active tokens.

    Takes hidden states and output projections rather than logits so that a fused kernel can compute the
    same quantity without materialising the logits.
    """
    student_logits = student_hidden @ student_weight.T
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_weight.T
    per_token = token_divergence(student_logits, teacher_logits, config.alpha, config.temperature, config.topk,
                                 config.tail)
    with torch.no_grad():
        log_p = student_logits.float().log_softmax(-1)
        entropy = -(log_p.exp() * log_p).nan_to_num().sum(-1)
    active = weights != 0
    return (per_token * weights).sum(), entropy[active].sum()
