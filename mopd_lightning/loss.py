"""Token-level quantities from final hidden states: the distillation loss (on top of ``mopd_kernels``), the
log-probabilities of the sampled tokens and the student's entropy.

Per token, with S and T the student and teacher distributions (both logits divided by ``temperature``, the
teacher's by ``teacher_temperature`` when set):
``alpha = 0`` is forward KL(T || S), ``alpha = 1`` reverse KL(S || T), and in between the generalized
Jensen-Shannon divergence ``(1 - alpha) KL(S || M) + alpha KL(T || M)`` with ``M = (1 - alpha) S + alpha T``.
With ``estimator: sampled_token`` the reverse KL is instead estimated on the sampled token alone (a per-token
advantage); with ``label_contrast``, ``KL(S || T) - KL(S || T')`` is, where ``T'`` is the teacher shown the same peers
with their labels swapped: ``log S`` cancels, leaving ``log T'(y) - log T(y)``. The module hands over final hidden
states and output projections; with ``fused_linear`` the kernel applies the projection chunk by chunk, so the
``(tokens x vocabulary)`` logits never exist.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.utils.checkpoint
from mopd_kernels import fused_linear_generalized_jsd, generalized_jsd

from .config import LossConfig


def distillation_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                      teacher_weight: torch.Tensor, weights: torch.Tensor, config: LossConfig,
                      tokens: Optional[torch.Tensor] = None, contrast_hidden: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
    """Sum over tokens of ``weights * divergence`` (``tokens``: the sampled ones, read by the sampled-token
    estimates alone; ``contrast_hidden``: the teacher under the swapped labels, read by ``label_contrast``)."""
    if config.estimator == "sampled_token":
        return sampled_token_reverse_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, weights,
                                        tokens, config)
    if config.estimator == "label_contrast":
        return label_contrast(student_hidden, student_weight, teacher_hidden, contrast_hidden, teacher_weight,
                              weights, tokens, config)
    common = dict(alpha=config.alpha, temperature=config.temperature, teacher_temperature=config.teacher_temperature,
                  weights=weights, reduction="sum", backend=config.backend)
    if config.fused_linear and config.topk is None:
        return fused_linear_generalized_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, **common)
    # top-k needs the student's logits to pick its tokens
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_weight.T
    return generalized_jsd(student_hidden @ student_weight.T, teacher_logits, topk=config.topk, tail=config.tail,
                           **common)


def sampled_token_reverse_kl(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                             teacher_weight: torch.Tensor, weights: torch.Tensor, tokens: torch.Tensor,
                             config: LossConfig) -> torch.Tensor:
    """Reverse KL(S || T) estimated on the sampled tokens alone (the reference's ``full_logit_distillation: false``,
    TRL's ``sampled_token``): per token ``log S(y) - log T(y)``, whose gradient is the score-function one,
    ``(log S(y) - log T(y)) * grad log S(y)``: the teacher-minus-student log-ratio as a per-token advantage. Its value is
    the estimate; only the sampled token's probability moves, not the rest of the distribution."""
    if tokens is None:
        raise ValueError("the sampled-token estimate needs the sampled tokens")
    student = token_logprobs(student_hidden, student_weight, tokens, temperature=config.temperature)
    return _score_function(student, student.detach() - _teacher_logprobs(teacher_hidden, teacher_weight, tokens,
                                                                         config), weights)


def label_contrast(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                   contrast_hidden: torch.Tensor, teacher_weight: torch.Tensor, weights: torch.Tensor,
                   tokens: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """``KL(S || T) - KL(S || T')`` on the sampled tokens, ``T'`` the teacher shown the same peers with their labels
    swapped: per token ``log T'(y) - log T(y)``, with the score-function gradient. What a peer context does to the
    teacher whatever its labels (a shorter, surer, differently worded answer: RLCSD's "style drift") is in both
    terms and cancels; what is left pulls the student toward the tokens the true labels favour over the swapped
    ones (after RLCSD, arXiv 2606.11709, whose wrong hint is here the same peers, mislabelled)."""
    if tokens is None or contrast_hidden is None:
        raise ValueError("the label contrast needs the sampled tokens and the teacher under the swapped labels")
    student = token_logprobs(student_hidden, student_weight, tokens, temperature=config.temperature)
    contrast = (_teacher_logprobs(contrast_hidden, teacher_weight, tokens, config)
                - _teacher_logprobs(teacher_hidden, teacher_weight, tokens, config))
    return _score_function(student, contrast, weights)


@torch.no_grad()
def _teacher_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, config: LossConfig
                      ) -> torch.Tensor:
    return token_logprobs(hidden, weight, tokens, temperature=config.teacher_temperature or config.temperature)


def _score_function(student_logp: torch.Tensor, value: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(weights * value)`` in the forward pass, ``sum(weights * value * grad log S(y))`` in the backward:
    a per-token estimate whose gradient is the score-function one (``value`` detached)."""
    value = value.detach()
    return (weights * (value + value * (student_logp - student_logp.detach()))).sum()


@torch.no_grad()
def entropy_and_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, chunk: int = 512
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per position: the entropy of the next-token distribution and log p(token), chunk by chunk, no gradient."""
    entropy, logp = [], []
    for rows, ids in zip(hidden.split(chunk), tokens.split(chunk)):
        log_p = (rows @ weight.T).float().log_softmax(-1)
        entropy.append(-(log_p.exp() * log_p).nan_to_num().sum(-1))
        logp.append(log_p.gather(-1, ids[:, None])[:, 0])
    return torch.cat(entropy), torch.cat(logp)


def _token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return (hidden @ weight.T).float().log_softmax(-1).gather(-1, tokens[:, None])[:, 0]


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, chunk: int = 512,
                   temperature: float = 1.0) -> torch.Tensor:
    """log p(token) at each position under softmax(logits / temperature), differentiable, chunk by chunk.

    With a graph, each chunk is recomputed in the backward pass instead of keeping its ``(chunk, V)``
    log-softmax: memory stays at one chunk of logits, whatever the number of tokens.
    """
    if temperature != 1.0:  # logits are linear in the hidden states: divide the (N, H) side, not the (N, V) one
        hidden = hidden / temperature
    parts = []
    for rows, ids in zip(hidden.split(chunk), tokens.split(chunk)):
        if torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad):
            parts.append(torch.utils.checkpoint.checkpoint(_token_logprobs, rows, weight, ids, use_reentrant=False))
        else:
            parts.append(_token_logprobs(rows, weight, ids))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
