"""The chunked torch op: the per-row generalized JSD loss and its analytical gradient, without Triton.

This is what runs on CPU (and wherever Triton is absent): rows are processed in chunks sized from a memory
budget, so the only (N, V) tensor ever allocated is the gradient itself, in the logits' dtype. Inside a
chunk everything is float32 (float64 for float64 inputs) in a few workspace buffers reused across chunks:
fresh large allocations cost page faults on every chunk, and in-place ops on warm buffers are the fast path.
"""

from __future__ import annotations

import torch

from ._common import NEG_LOG, compute_dtype, log_floor, rows_per_chunk

# float32 (V,) buffers alive per row at the peak of a chunk (log-probs, probs, mixture, scaled input, masks).
TEMPS_PER_ROW = 7


def apply_support_rule(s: torch.Tensor, t: torch.Tensor, alpha: float):
    """Drop entries that would make a KL infinite (see generalized_jsd's docstring).

    alpha=0 (forward KL): entries where the student is -inf leave both distributions (teacher renormalised).
    alpha=1 (reverse KL): entries where the teacher is -inf leave both distributions (student renormalised).
    0<alpha<1 is always finite and left exact.
    """
    if alpha == 0:
        banned = torch.isneginf(s)
        if banned.any():
            t = t.masked_fill(banned, float("-inf"))
    elif alpha == 1:
        banned = torch.isneginf(t)
        if banned.any():
            s = s.masked_fill(banned, float("-inf"))
    return s, t


def divergence(log_s, log_t, alpha, want_grad, p_s=None, p_t=None, mix=None):
    """Per-row divergence of log-probabilities (last dim), and g = dLoss/dlog_s with log_s taken as free.

    Consumes log_s and log_t (their storage is reused); p_s, p_t (= exp of them) are computed if not given,
    mix is an optional buffer for log M. Log 0 must be given as NEG_LOG (finite), never -inf.
    Returns (loss, g, G = sum(g), p_s); g and G are None when want_grad is False. With M = (1-a)S + aT:
      a=0:  L = sum T (log T - log S)                         g = -T
      a=1:  L = sum S (log S - log T)                         g = S (log S - log T + 1)
      else: L = (1-a) sum S (log S - log M) + a sum T (log T - log M)    g = (1-a) S (log S - log M)
    For the JSD, dL/dS_i = (1-a)(log S_i + 1 - log M_i) - (1-a)((1-a)S_i + aT_i)/M_i = (1-a)(log S_i - log M_i).
    The chain rule through a softmax is then dL/ds_j = g_j - S_j G.
    """
    if p_s is None and (alpha != 0 or want_grad):
        p_s = log_s.exp()
    if p_t is None and alpha != 1:
        p_t = log_t.exp()
    if alpha == 0:
        loss = log_t.sub_(log_s).mul_(p_t).sum(-1)
        if not want_grad:
            return loss, None, None, p_s
        g = p_t.neg_()
        return loss, g, g.sum(-1, keepdim=True), p_s
    if alpha == 1:
        term_s = log_s.sub_(log_t).mul_(p_s)
        loss = term_s.sum(-1)
        if not want_grad:
            return loss, None, None, p_s
        g = term_s.add_(p_s)
        return loss, g, g.sum(-1, keepdim=True), p_s
    mix = torch.mul(p_s, 1.0 - alpha, out=mix).add_(p_t, alpha=alpha).log_().clamp_min_(log_floor(log_s.dtype))
    kl_t = log_t.sub_(mix).mul_(p_t).sum(-1)
    term_s = log_s.sub_(mix).mul_(p_s)
    kl_s = term_s.sum(-1, keepdim=True)
    loss = (1.0 - alpha) * kl_s.squeeze(-1) + alpha * kl_t
    if not want_grad:
        return loss, None, None, p_s
    return loss, term_s.mul_(1.0 - alpha), kl_s.mul_(1.0 - alpha), p_s


def _buffer(workspace: dict, name: str, n: int, v: int, dtype, device) -> torch.Tensor:
    """A reusable (n, v) buffer: the first n rows of a cached one when it is big enough."""
    buf = workspace.get(name)
    if buf is None or buf.shape[0] < n or buf.shape[1] != v or buf.dtype != dtype or buf.device != device:
        buf = workspace[name] = torch.empty(n, v, dtype=dtype, device=device)
    return buf[:n]


def _log_probs(x, inv_temp, cdt, log_out, p_out, scratch):
    """log_softmax and softmax of x / temperature into the given buffers; log 0 -> NEG_LOG, all -inf rows
    -> log p = NEG_LOG and p = 0 (softmax is cheaper than exp of the log-probs)."""
    if x.dtype != cdt or inv_temp != 1.0:  # convert once into a warm buffer, not once per softmax
        x = scratch.copy_(x)
        if inv_temp != 1.0:
            x.mul_(inv_temp)
    torch.log_softmax(x, -1, out=log_out).nan_to_num_(nan=NEG_LOG, neginf=NEG_LOG)
    if p_out is not None:
        torch.softmax(x, -1, out=p_out).nan_to_num_(nan=0.0)
    return log_out, p_out


def for_each_active_chunk(student, teacher, row_weight, grad_out, chunk_rows, chunk_fn):
    """Run chunk_fn(s, t, w, out) -> loss over row chunks, skipping rows with weight 0.

    chunk_fn writes its (already weighted) gradient into `out` when out is not None. Skipped rows get loss 0
    and a zero gradient. Returns the per-row losses.
    """
    n = student.shape[0]
    loss = torch.zeros(n, dtype=compute_dtype(student.dtype), device=student.device)
    for start in range(0, n, chunk_rows):
        end = min(n, start + chunk_rows)
        w = row_weight[start:end]
        active = w != 0
        n_active = int(active.sum())
        out = None if grad_out is None else grad_out[start:end]
        if n_active == end - start:
            loss[start:end] = chunk_fn(student[start:end], teacher[start:end], w, out)
            continue
        if out is not None:
            out.zero_()
        if n_active == 0:
            continue
        idx = active.nonzero().squeeze(1)
        sub_out = None if out is None else torch.empty(n_active, out.shape[1], dtype=out.dtype, device=out.device)
        loss[start:end].index_copy_(0, idx, chunk_fn(student[start:end].index_select(0, idx),
                                                     teacher[start:end].index_select(0, idx), w[idx], sub_out))
        if out is not None:
            out.index_copy_(0, idx, sub_out)
    return loss


def jsd_rows_torch(student, teacher, row_weight, alpha, temperature, grad_out=None, chunk_bytes=None,
                   workspace=None):
    """Per-row loss of (N, V) logits; if grad_out is given, write row_weight_i * dloss_i/dlogits_i into it.

    grad_out may be `student` itself (each chunk is read before it is overwritten). `workspace` is a dict
    of buffers that callers looping over chunks pass again to reuse them.
    """
    n, v = student.shape
    cdt = compute_dtype(student.dtype)
    inv_temp = 1.0 / float(temperature)
    want_grad = grad_out is not None
    rows = rows_per_chunk(n, v * torch.finfo(cdt).bits // 8 * TEMPS_PER_ROW, chunk_bytes)
    workspace = {} if workspace is None else workspace

    def chunk_fn(s, t, w, out):
        m = s.shape[0]

        def buf(name):
            return _buffer(workspace, name, m, v, cdt, s.device)

        s, t = apply_support_rule(s, t, alpha)
        need_p_s = alpha != 0 or want_grad
        log_s, p_s = _log_probs(s, inv_temp, cdt, buf("log_s"), buf("p_s") if need_p_s else None, buf("scaled"))
        log_t, p_t = _log_probs(t, inv_temp, cdt, buf("log_t"), buf("p_t") if alpha != 1 else None, buf("scaled"))
        loss, g, big_g, p_s = divergence(log_s, log_t, alpha, want_grad, p_s, p_t,
                                         buf("mix") if 0 < alpha < 1 else None)
        if out is not None:  # dL/dlogits = (g - S G) / temperature, times the row weight
            g.addcmul_(p_s, big_g, value=-1.0)
            torch.mul(g, (w.to(cdt) * inv_temp).unsqueeze(1), out=out)
        return loss

    return for_each_active_chunk(student, teacher, row_weight, grad_out, rows, chunk_fn)
