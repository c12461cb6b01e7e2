"""Fused output projection + generalized JSD: the loss from hidden states without (N, V) logits.

Tokens are processed in chunks of rows sized from a memory budget (not Liger's fixed V/H chunk count):
per chunk, logits = hidden @ weight.T for student and teacher, the per-row loss op (Triton kernel or torch)
writes dloss/dlogits in place over the student chunk logits, and two matmuls turn it into grad_hidden rows
and a float32 grad_weight accumulator. Rows with weight 0 are dropped before any matmul.

For reduction "sum"/"mean" the gradients are computed during the forward pass (backward only rescales them).
"none" cannot precompute grad_weight (it depends on the incoming per-token grads), so its forward computes
losses only and its backward recomputes the chunks with those grads folded into the row weights.
"""

from __future__ import annotations

import torch

from ._common import compute_dtype, row_weights, rows_per_chunk
from ._torch_jsd import TEMPS_PER_ROW


# Bigger than the plain op's budget: the forward matmuls get faster with more rows, and grad_weight (V, H) is
# read and written once per chunk. On CPU at V=49152, H=576 this gives ~300-row chunks.
DEFAULT_FUSED_CHUNK_BYTES = 512 * 2**20


def chunk_rows(n: int, v: int, logits_dtype: torch.dtype, torch_rows: bool, budget: int | None = None) -> int:
    """Rows per chunk: student + teacher chunk logits, plus the float32 temporaries of the torch row op."""
    per_row = v * 2 * torch.finfo(logits_dtype).bits // 8
    if torch_rows:
        per_row += v * 4 * TEMPS_PER_ROW
    return rows_per_chunk(n, per_row, DEFAULT_FUSED_CHUNK_BYTES if budget is None else budget)


def fused_pass(hs, ws, ht, wt, row_weight, alpha, temperature, rows_fn, chunk_size, need_h, need_w):
    """Per-row losses and, if asked, grads to hs and ws of sum_i row_weight_i * loss_i."""
    n, h = hs.shape
    v = ws.shape[0]
    cdt = compute_dtype(hs.dtype)
    loss = torch.zeros(n, dtype=cdt, device=hs.device)
    grad_h = torch.zeros(hs.shape, dtype=hs.dtype, device=hs.device) if need_h else None
    grad_w = torch.zeros(v, h, dtype=cdt, device=ws.device) if need_w else None
    active = (row_weight != 0).nonzero().squeeze(1)
    n_active = active.numel()
    if n_active == n:
        active = None  # plain slices: no gathers, matmuls straight into grad_h
    chunk = max(1, min(int(chunk_size), n_active))
    s_buf = torch.empty(chunk, v, dtype=hs.dtype, device=hs.device)
    t_buf = torch.empty(chunk, v, dtype=ht.dtype, device=ht.device)
    workspace = {}  # the row op's buffers, reused by every chunk
    with torch.autocast(hs.device.type, enabled=False):  # matmuls in the inputs' dtype, as given
        for start in range(0, n_active, chunk):
            end = min(n_active, start + chunk)
            rows = slice(start, end) if active is None else active[start:end]
            h_s, h_t, w = hs[rows], ht[rows], row_weight[rows]
            s = torch.mm(h_s, ws.t(), out=s_buf[: end - start])
            t = torch.mm(h_t, wt.t(), out=t_buf[: end - start])
            # The chunk logits are ours: the gradient overwrites them in place.
            grad_out = s if (need_h or need_w) else None
            loss[rows] = rows_fn(s, t, w, alpha, temperature, grad_out=grad_out, workspace=workspace).to(cdt)
            if need_h:
                if active is None:
                    torch.mm(s, ws, out=grad_h[start:end])
                else:
                    grad_h.index_copy_(0, rows, torch.mm(s, ws))
            if need_w:
                if grad_w.dtype == s.dtype:
                    grad_w.addmm_(s.t(), h_s)
                else:
                    grad_w.add_(torch.mm(s.t(), h_s))
    if grad_w is not None:
        grad_w = grad_w.to(ws.dtype)
    return loss, grad_h, grad_w


class FusedLinearGeneralizedJSDFunction(torch.autograd.Function):
    """Gradients flow to student_hidden and student_weight only; the teacher side is constant."""

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, weights, alpha, temperature, reduction, chunk_size, rows_fn):
        n = hs.shape[0]
        cdt = compute_dtype(hs.dtype)
        w, coef = row_weights(weights, n, reduction, hs.device, cdt)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.reduction = reduction
        if reduction == "none":
            loss, _, _ = fused_pass(hs, ws, ht, wt, w, alpha, temperature, rows_fn, chunk_size, False, False)
            ctx.save_for_backward(hs, ws, ht, wt, w)
            ctx.args = (alpha, temperature, rows_fn, chunk_size)
            return loss * w
        loss, grad_h, grad_w = fused_pass(hs, ws, ht, wt, coef, alpha, temperature, rows_fn, chunk_size,
                                          need_h, need_w)
        ctx.save_for_backward(grad_h, grad_w)
        return (loss * coef).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.reduction == "none":
            hs, ws, ht, wt, w = ctx.saved_tensors
            alpha, temperature, rows_fn, chunk_size = ctx.args
            _, grad_h, grad_w = fused_pass(hs, ws, ht, wt, w * grad_loss.to(w.dtype), alpha, temperature, rows_fn,
                                           chunk_size, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        else:
            grad_h, grad_w = ctx.saved_tensors
            if not (grad_loss.numel() == 1 and float(grad_loss) == 1.0):
                grad_h = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
                grad_w = None if grad_w is None else grad_w * grad_loss.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None
