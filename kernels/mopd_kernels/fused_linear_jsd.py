"""Fused output projection + generalized JSD: the loss from hidden states without float32 (N, V) logits.

Tokens are processed in chunks of rows sized from a memory budget (not a fixed chunk count): per chunk,
logits = hidden @ weight.T for student and teacher (the two logits GEMMs), and the per-row loss op (Triton kernel
or torch) overwrites the student chunk logits with dloss/dlogits. The two gradient GEMMs then depend on the dtype:

- 16-bit inputs (the GPU case): the student chunk logits are rows of one (N, V) buffer in the inputs' dtype, so
  after the loop grad_hidden = G @ W and grad_weight = G.T @ H are one GEMM each; grad_weight is accumulated in
  float32 inside that GEMM and rounded once, and no (V, H) float32 accumulator is read and written per chunk.
- 32/64-bit inputs: per chunk, grad_hidden rows and an in-place addmm into grad_weight, which is already exact in
  float32; memory stays at one chunk (the CPU case, where an (N, V) float32 buffer would dominate).

Rows with weight 0 are dropped before any GEMM. For reduction "sum"/"mean" the gradients are computed during the
forward pass (backward only rescales them). "none" cannot precompute grad_weight (it depends on the incoming
per-token grads), so its forward computes losses only and its backward recomputes with those grads folded into
the row weights.
"""

from __future__ import annotations

import torch

from ._common import compute_dtype, row_weights, rows_per_chunk
from .chunked_jsd import TEMPS_PER_ROW


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
    active = (row_weight != 0).nonzero().squeeze(1)
    n_active = active.numel()
    if n_active == n:
        active = None  # plain slices: no gathers, GEMMs straight into grad_h
    hs_active = hs if active is None else hs[active]
    whole = (need_h or need_w) and hs.dtype.itemsize == 2  # 16-bit: gradient GEMMs once, over all rows
    chunk = max(1, min(int(chunk_size), n_active))
    s_all = torch.empty(n_active, v, dtype=hs.dtype, device=hs.device) if whole else None
    s_buf = None if whole else torch.empty(chunk, v, dtype=hs.dtype, device=hs.device)
    t_buf = torch.empty(chunk, v, dtype=ht.dtype, device=ht.device)
    grad_h = torch.zeros(hs.shape, dtype=hs.dtype, device=hs.device) if need_h and not whole else None
    grad_w = torch.zeros(v, h, dtype=cdt, device=ws.device) if need_w and not whole else None
    workspace = {}  # the row op's buffers, reused by every chunk
    with torch.autocast(hs.device.type, enabled=False):  # GEMMs in the inputs' dtype, as given
        for start in range(0, n_active, chunk):
            end = min(n_active, start + chunk)
            rows = slice(start, end) if active is None else active[start:end]
            h_s = hs_active[start:end]
            s = torch.mm(h_s, ws.t(), out=s_all[start:end] if whole else s_buf[: end - start])
            t = torch.mm(ht[rows], wt.t(), out=t_buf[: end - start])
            # The chunk logits are ours: the gradient overwrites them in place.
            grad_out = s if (need_h or need_w) else None
            loss[rows] = rows_fn(s, t, row_weight[rows], alpha, temperature, grad_out=grad_out,
                                 workspace=workspace).to(cdt)
            if whole:
                continue
            if need_h:
                if active is None:
                    torch.mm(s, ws, out=grad_h[start:end])
                else:
                    grad_h.index_copy_(0, rows, torch.mm(s, ws))
            if need_w:
                grad_w.addmm_(s.t(), h_s)
        if whole:
            if need_h:
                grad_h = s_all @ ws if active is None else torch.zeros_like(hs).index_copy_(0, active, s_all @ ws)
            if need_w:
                grad_w = s_all.t() @ hs_active
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
