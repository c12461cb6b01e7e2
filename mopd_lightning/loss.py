"""The token-level distillation loss of a micro-batch, on top of ``mopd_kernels``.

Per token, with S and T the student and teacher distributions (both logits divided by ``temperature``):
``alpha = 0`` is forward KL(T || S), ``alpha = 1`` reverse KL(S || T), and in between the generalized
Jensen-Shannon divergence ``(1 - alpha) KL(S || M) + alpha KL(T || M)`` with ``M = (1 - alpha) S + alpha T``.
The module hands over final hidden states and output projections; with ``fused_linear`` the kernel applies
the projection chunk by chunk, so the ``(tokens x vocabulary)`` logits never exist.
"""

from __future__ import annotations

from typing import Tuple

import torch
from mopd_kernels import fused_linear_generalized_jsd, generalized_jsd

from .config import LossConfig


def distillation_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                      teacher_weight: torch.Tensor, weights: torch.Tensor, config: LossConfig
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sum over tokens of ``weights * divergence``, and the summed student entropy (no gradient) of the
    tokens with non-zero weight."""
    common = dict(alpha=config.alpha, temperature=config.temperature, weights=weights, reduction="sum",
                  backend=config.backend)
    if config.fused_linear and config.topk is None:
        loss = fused_linear_generalized_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, **common)
    else:  # top-k needs the student's logits to pick its tokens
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.T
        loss = generalized_jsd(student_hidden @ student_weight.T, teacher_logits, topk=config.topk, tail=config.tail,
                               **common)
    return loss, student_entropy_sum(student_hidden, student_weight, weights != 0)


@torch.no_grad()
def student_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Summed entropy of the student's next-token distributions at the masked-in positions, chunk by chunk."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for rows in hidden[mask].split(chunk):
        log_p = (rows @ weight.T).float().log_softmax(-1)
        total += -(log_p.exp() * log_p).nan_to_num().sum()
    return total


@torch.no_grad()
def sampled_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, chunk: int = 512
                           ) -> torch.Tensor:
    """log p(token) under the student (temperature 1) at each position, chunk by chunk; for importance weights."""
    out = [(rows @ weight.T).float().log_softmax(-1).gather(-1, ids[:, None])[:, 0]
           for rows, ids in zip(hidden.split(chunk), tokens.split(chunk))]
    return torch.cat(out)
