"""Naive eager reference: the formula written plainly on full (N, V) tensors, autograd for the backward.

Memory-hungry on purpose (like TRL's GKD loss): it is the baseline for tests (run it in float64) and
benchmarks. Same conventions as mopd_kernels.generalized_jsd, including the -inf support rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _kl_terms(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum p (log p - log q) with 0 log 0 = 0; the inner where keeps inf - inf out of the backward."""
    live = p > 0
    diff = torch.where(live, log_p, 0.0) - torch.where(live, log_q, 0.0)
    return (p * diff).sum(-1)


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim (keepdim) that is -inf, with a zero gradient, on all -inf rows."""
    empty = torch.isneginf(x).all(-1, keepdim=True)
    return torch.logsumexp(x.masked_fill(empty, 0.0), dim=-1, keepdim=True).masked_fill(empty, float("-inf"))


def generalized_jsd_reference(student_logits, teacher_logits, *, alpha=0.5, temperature=1.0,
                              teacher_temperature=None, topk=None, tail=True, weights=None, reduction="mean"):
    s = student_logits / temperature
    t = teacher_logits.detach() / (temperature if teacher_temperature is None else teacher_temperature)
    if alpha == 0:  # forward KL: drop entries the student cannot emit
        t = t.masked_fill(torch.isneginf(s), float("-inf"))
    elif alpha == 1:  # reverse KL: drop entries the teacher cannot emit
        s = s.masked_fill(torch.isneginf(t), float("-inf"))
    log_s = F.log_softmax(s, dim=-1)
    log_t = F.log_softmax(t, dim=-1)
    if topk is not None:
        idx = s.detach().topk(min(int(topk), s.shape[-1]), dim=-1).indices
        log_s_k, log_t_k = log_s.gather(-1, idx), log_t.gather(-1, idx)
        if tail:
            in_k = torch.zeros_like(s, dtype=torch.bool).scatter(-1, idx, True)
            log_s_rest = _logsumexp(log_s.masked_fill(in_k, float("-inf")))  # mass outside the top-k
            log_t_rest = _logsumexp(log_t.masked_fill(in_k, float("-inf")))
            log_s = torch.cat([log_s_k, log_s_rest], dim=-1)
            log_t = torch.cat([log_t_k, log_t_rest], dim=-1)
        else:
            log_s, log_t = F.log_softmax(log_s_k, dim=-1), F.log_softmax(log_t_k, dim=-1)
    p_s, p_t = log_s.exp(), log_t.exp()
    if alpha == 0:
        loss = _kl_terms(p_t, log_t, log_s)
    elif alpha == 1:
        loss = _kl_terms(p_s, log_s, log_t)
    else:
        mix = (1 - alpha) * p_s + alpha * p_t
        log_m = torch.log(torch.where(mix > 0, mix, 1.0))
        loss = (1 - alpha) * _kl_terms(p_s, log_s, log_m) + alpha * _kl_terms(p_t, log_t, log_m)
    w = torch.ones_like(loss) if weights is None else weights.detach().to(loss.dtype).reshape(loss.shape)
    loss = loss * w
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (w != 0).sum().clamp_min(1)


def fused_linear_generalized_jsd_reference(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                           **kwargs):
    """Materialise both (N, V) logits, then the reference loss."""
    return generalized_jsd_reference(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T,
                                     **kwargs)
