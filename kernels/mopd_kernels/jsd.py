"""Generalized JSD on (N, V) logits: the autograd Function in front of a per-row loss op (the Triton kernel of
``triton_jsd``, the chunked torch op of ``chunked_jsd``, or the top-k op).

The forward pass precomputes the gradient for reduction "sum"/"mean" (backward only rescales it); for
"none" the forward computes losses only and the backward recomputes with the incoming per-token grads folded
into the row weights, so arbitrary upstream gradients stay exact without holding an (N, V) buffer.
"""

from __future__ import annotations

import torch

from ._common import compute_dtype, row_weights


class GeneralizedJSDFunction(torch.autograd.Function):
    """Autograd wrapper around a per-row loss function `rows_fn` (Triton, torch or top-k).

    rows_fn(student, teacher, row_weight, alpha, temperature, grad_out=None) -> per-row loss; with grad_out
    it also writes row_weight_i * dloss_i / dstudent_i there. Only the student receives a gradient.
    """

    @staticmethod
    def forward(ctx, student, teacher, weights, alpha, temperature, reduction, rows_fn):
        n = student.shape[0]
        cdt = compute_dtype(student.dtype)
        w, coef = row_weights(weights, n, reduction, student.device, cdt)
        ctx.reduction = reduction
        if reduction == "none":
            loss = rows_fn(student, teacher, w, alpha, temperature).to(cdt)
            ctx.save_for_backward(student, teacher, w)
            ctx.args = (alpha, temperature, rows_fn)
            return loss * w
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        loss = rows_fn(student, teacher, coef, alpha, temperature, grad_out=grad).to(cdt)
        ctx.save_for_backward(grad)
        return (loss * coef).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.reduction == "none":
            student, teacher, w = ctx.saved_tensors
            alpha, temperature, rows_fn = ctx.args
            grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
            rows_fn(student, teacher, w * grad_loss.to(w.dtype), alpha, temperature, grad_out=grad)
        else:
            (grad,) = ctx.saved_tensors
            if not (grad_loss.numel() == 1 and float(grad_loss) == 1.0):
                grad = grad * grad_loss.to(grad.dtype)
        return grad, None, None, None, None, None, None
