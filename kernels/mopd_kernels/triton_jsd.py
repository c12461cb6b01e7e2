"""The generalized JSD Triton kernel on (N, V) logits, one program per row, and its launcher.

Math (per token; s = student_logits / tau, t = teacher_logits / tau, S = softmax(s), T = softmax(t),
M = (1-a) S + a T, m = log M):
    a = 0      L = KL(T || S) = sum T (log T - log S)          dL/ds_j = S_j - T_j
    a = 1      L = KL(S || T) = sum S (log S - log T)          dL/ds_j = S_j (log S_j - log T_j - L)
    0 < a < 1  L = (1-a) KL(S || M) + a KL(T || M)             dL/ds_j = (1-a) S_j (log S_j - m_j - KL(S || M))
and dL/d student_logits = dL/ds / tau. The kernel runs one program per row and streams the vocabulary in
blocks: pass 1 gets both log-normalisers with an online logsumexp, pass 2 the loss (and the row constant
KL(S||M) or KL(S||T)), pass 3 writes the gradient (pass 2 already does for a = 0). The third pass exists
because the JSD gradient needs KL(S||M), which mixes both normalisers inside a log and cannot be accumulated
online in pass 1; re-reading the logits is cheaper than keeping a float32 row buffer. The gradient goes straight
into a buffer of the logits' dtype -- no float32 (N, V) intermediate -- and can overwrite the student
logits themselves when the caller owns them (the fused-linear op does).
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, NEG_LOG

if HAS_TRITON:
    import triton
    import triton.language as tl

    _NEG_LOG = tl.constexpr(NEG_LOG)  # log 0 stand-in: finite, so 0 * log 0 == 0
    _FLOOR = tl.constexpr(-104.0)  # below log(min float32 subnormal): clamps log M only where M underflowed

    @triton.jit
    def _block_logits(s_row, t_row, cols, mask, inv_temp, MODE: tl.constexpr):
        """Student and teacher logits of one vocabulary block, divided by the temperature, with MODE's support
        rule applied (forward KL drops entries the student bans, reverse KL those the teacher bans)."""
        NEG_INF: tl.constexpr = float("-inf")
        s = tl.load(s_row + cols, mask=mask, other=NEG_INF).to(tl.float32) * inv_temp
        t = tl.load(t_row + cols, mask=mask, other=NEG_INF).to(tl.float32) * inv_temp
        if MODE == 0:
            t = tl.where(s == NEG_INF, NEG_INF, t)
        if MODE == 1:
            s = tl.where(t == NEG_INF, NEG_INF, s)
        return s, t

    @triton.jit
    def _block_log_probs(s_row, t_row, cols, mask, inv_temp, lse_s, lse_t, MODE: tl.constexpr):
        """Log-probabilities of one vocabulary block, given both log-normalisers."""
        s, t = _block_logits(s_row, t_row, cols, mask, inv_temp, MODE)
        return tl.maximum(s - lse_s, _NEG_LOG), tl.maximum(t - lse_t, _NEG_LOG)

    @triton.jit
    def _log_mixture(p_s, p_t, alpha):
        """log M of M = (1 - alpha) S + alpha T, floored only where M underflowed."""
        return tl.maximum(tl.log((1.0 - alpha) * p_s + alpha * p_t), _FLOOR)

    @triton.jit
    def _gjsd_kernel(
        S_ptr, s_stride, T_ptr, t_stride, G_ptr, g_stride, LOSS_ptr, W_ptr,
        V, inv_temp, alpha,
        MODE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """One row: MODE 0 forward KL, 1 reverse KL, 2 generalized JSD. W = row weight (0 -> skipped row)."""
        row = tl.program_id(0).to(tl.int64)
        s_row = S_ptr + row * s_stride
        t_row = T_ptr + row * t_stride
        g_row = G_ptr + row * g_stride
        offs = tl.arange(0, BLOCK)
        NEG_INF: tl.constexpr = float("-inf")
        w = tl.load(W_ptr + row).to(tl.float32)
        coef = w * inv_temp
        if w == 0.0:
            if COMPUTE_GRAD:
                for off in range(0, V, BLOCK):
                    cols = off + offs
                    tl.store(g_row + cols, tl.zeros([BLOCK], tl.float32).to(G_ptr.dtype.element_ty), mask=cols < V)
            tl.store(LOSS_ptr + row, 0.0)
        else:
            # Pass 1: per-lane online max / sum-exp for both rows, reduced once at the end.
            ms = tl.full([BLOCK], NEG_INF, tl.float32)
            ds = tl.zeros([BLOCK], tl.float32)
            mt = tl.full([BLOCK], NEG_INF, tl.float32)
            dt = tl.zeros([BLOCK], tl.float32)
            for off in range(0, V, BLOCK):
                cols = off + offs
                mask = cols < V
                s, t = _block_logits(s_row, t_row, cols, mask, inv_temp, MODE)
                ms_new = tl.maximum(ms, s)
                base = tl.where(ms_new == NEG_INF, 0.0, ms_new)
                ds = ds * tl.exp(ms - base) + tl.exp(s - base)
                ms = ms_new
                mt_new = tl.maximum(mt, t)
                base = tl.where(mt_new == NEG_INF, 0.0, mt_new)
                dt = dt * tl.exp(mt - base) + tl.exp(t - base)
                mt = mt_new
            m = tl.max(ms, axis=0)
            m = tl.where(m == NEG_INF, 0.0, m)
            lse_s = m + tl.log(tl.sum(ds * tl.exp(ms - m), axis=0))
            lse_s = tl.where(lse_s == NEG_INF, 0.0, lse_s)
            m = tl.max(mt, axis=0)
            m = tl.where(m == NEG_INF, 0.0, m)
            lse_t = m + tl.log(tl.sum(dt * tl.exp(mt - m), axis=0))
            lse_t = tl.where(lse_t == NEG_INF, 0.0, lse_t)

            # Pass 2: loss terms.
            acc_a = tl.zeros([BLOCK], tl.float32)
            acc_b = tl.zeros([BLOCK], tl.float32)
            for off in range(0, V, BLOCK):
                cols = off + offs
                mask = cols < V
                log_s, log_t = _block_log_probs(s_row, t_row, cols, mask, inv_temp, lse_s, lse_t, MODE)
                p_s = tl.exp(log_s)
                if MODE == 0:
                    p_t = tl.exp(log_t)
                    acc_a += p_t * (log_t - log_s)
                    if COMPUTE_GRAD:
                        tl.store(g_row + cols, ((p_s - p_t) * coef).to(G_ptr.dtype.element_ty), mask=mask)
                elif MODE == 1:
                    acc_a += p_s * (log_s - log_t)
                else:
                    p_t = tl.exp(log_t)
                    log_m = _log_mixture(p_s, p_t, alpha)
                    acc_a += p_s * (log_s - log_m)
                    acc_b += p_t * (log_t - log_m)
            kl_a = tl.sum(acc_a, axis=0)
            if MODE == 2:
                tl.store(LOSS_ptr + row, (1.0 - alpha) * kl_a + alpha * tl.sum(acc_b, axis=0))
            else:
                tl.store(LOSS_ptr + row, kl_a)

            # Pass 3: gradient that needs the row constant kl_a.
            if COMPUTE_GRAD and MODE != 0:
                for off in range(0, V, BLOCK):
                    cols = off + offs
                    mask = cols < V
                    log_s, log_t = _block_log_probs(s_row, t_row, cols, mask, inv_temp, lse_s, lse_t, MODE)
                    p_s = tl.exp(log_s)
                    if MODE == 1:
                        g = p_s * (log_s - log_t - kl_a)
                    else:
                        p_t = tl.exp(log_t)
                        log_m = _log_mixture(p_s, p_t, alpha)
                        g = (1.0 - alpha) * p_s * (log_s - log_m - kl_a)
                    tl.store(g_row + cols, (g * coef).to(G_ptr.dtype.element_ty), mask=mask)


def jsd_rows_triton(student, teacher, row_weight, alpha, temperature, grad_out=None, block=None, workspace=None):
    """Per-row loss of (N, V) logits via the Triton kernel; if grad_out is given, write
    row_weight_i * dloss_i/dlogits_i into it (grad_out may be `student` itself). No workspace needed."""
    if student.stride(-1) != 1:
        student = student.contiguous()
    if teacher.stride(-1) != 1:
        teacher = teacher.contiguous()
    n, v = student.shape
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    if n == 0:
        return loss
    weight = row_weight.to(device=student.device, dtype=torch.float32).contiguous()
    mode = 0 if alpha == 0 else (1 if alpha == 1 else 2)
    if block is None:
        block = min(4096, max(1024, triton.next_power_of_2(v)))
    grad = student if grad_out is None else grad_out
    assert grad.stride(-1) == 1, "grad_out must be contiguous in the vocabulary dimension"
    _gjsd_kernel[(n,)](
        student, student.stride(0), teacher, teacher.stride(0), grad, grad.stride(0), loss, weight,
        v, 1.0 / float(temperature), float(alpha),
        MODE=mode, COMPUTE_GRAD=grad_out is not None, BLOCK=block, num_warps=8 if block >= 4096 else 4,
    )
    return loss
