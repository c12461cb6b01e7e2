"""Top-k generalized JSD: the reference implementation's compatibility mode (topk=100).

The divergence is taken over the student's top-k vocabulary entries (indices carry no gradient), plus,
with tail=True, one bucket holding the remaining probability mass of each distribution; with tail=False
both distributions are renormalised over the k entries. Torch ops on every backend: the (k+1)-class
divergence is tiny, and the dense part (log-normalisers, tail mass, gradient) is chunked over rows.

Gradient, with s = logits / temperature, q = the reduced log-probs and g = dL/dq_S (see divergence()),
G = sum(g), P_r = tail mass of S, K = top-k set:
  tail=True:   dL/ds_j = g_j [j in K] + g_r S_j / P_r [j not in K] - S_j G
  tail=False:  dL/ds_j = (g_j - softmax_K(s)_j G) [j in K]
"""

from __future__ import annotations

import torch

from ._common import NEG_LOG, compute_dtype, rows_per_chunk
from .chunked_jsd import TEMPS_PER_ROW, apply_support_rule, divergence, for_each_active_chunk


def _lse(x: torch.Tensor):
    """(logsumexp over the last dim, the same with 0 in place of -inf): raw for values, safe to subtract."""
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    return lse, lse.masked_fill(torch.isneginf(lse), 0.0)


def _chunk(s_in, t_in, alpha, inv_temp, cdt, topk, tail, want_grad):
    s = s_in.to(cdt) * inv_temp
    t = t_in.to(cdt) * inv_temp
    s, t = apply_support_rule(s, t, alpha)
    k = min(int(topk), s.shape[-1])
    idx = s.topk(k, dim=-1, sorted=False).indices
    s_k, t_k = s.gather(1, idx), t.gather(1, idx)
    if tail:
        _, lse_s = _lse(s)
        _, lse_t = _lse(t)
        rest_s, rest_s_safe = _lse(s.scatter(1, idx, float("-inf")))  # exact tail mass: no 1 - sum(p)
        rest_t, _ = _lse(t.scatter(1, idx, float("-inf")))
        log_s = torch.cat([s_k, rest_s], dim=1).sub_(lse_s).nan_to_num_(nan=NEG_LOG, neginf=NEG_LOG)
        log_t = torch.cat([t_k, rest_t], dim=1).sub_(lse_t).nan_to_num_(nan=NEG_LOG, neginf=NEG_LOG)
    else:
        log_s = torch.log_softmax(s_k, -1).nan_to_num_(nan=NEG_LOG, neginf=NEG_LOG)
        log_t = torch.log_softmax(t_k, -1).nan_to_num_(nan=NEG_LOG, neginf=NEG_LOG)
    loss, g, big_g, q_s = divergence(log_s, log_t, alpha, want_grad)
    if g is None:
        return loss, None
    if tail:
        # Dense part for every j, then overwrite the top-k entries.
        grad = (s - lse_s).exp_().mul_(-big_g)
        grad.add_((s - rest_s_safe).exp_().mul_(g[:, k:]))  # S_j / P_r, <= 1 off K
        grad.scatter_(1, idx, g[:, :k] - q_s[:, :k] * big_g)
    else:
        grad = torch.zeros_like(s)
        grad.scatter_(1, idx, g - q_s * big_g)
    return loss, grad


def topk_jsd_rows_torch(student, teacher, row_weight, alpha, temperature, grad_out=None, *, topk, tail=True,
                        chunk_bytes=None):
    """Per-row top-k loss; if grad_out is given, write row_weight_i * dloss_i/dlogits_i into it."""
    if int(topk) < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    n, v = student.shape
    cdt = compute_dtype(student.dtype)
    inv_temp = 1.0 / float(temperature)
    want_grad = grad_out is not None
    rows = rows_per_chunk(n, v * torch.finfo(cdt).bits // 8 * (TEMPS_PER_ROW + 3), chunk_bytes)  # + scatter copies

    def chunk_fn(s, t, w, out):
        loss, g = _chunk(s, t, alpha, inv_temp, cdt, topk, tail, want_grad)
        if out is not None:
            torch.mul(g, (w.to(cdt) * inv_temp).unsqueeze(1), out=out)
        return loss

    return for_each_active_chunk(student, teacher, row_weight, grad_out, rows, chunk_fn)
