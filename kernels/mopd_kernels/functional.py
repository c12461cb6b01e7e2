"""Public functions: argument checks and backend dispatch in front of the autograd Functions."""

from __future__ import annotations

from functools import partial

import torch

from ._common import check_args, resolve_backend, teacher_at_its_temperature
from .chunked_jsd import jsd_rows_torch
from .fused_linear_jsd import FusedLinearGeneralizedJSDFunction, chunk_rows
from .jsd import GeneralizedJSDFunction
from .triton_jsd import jsd_rows_triton
from .topk_jsd import topk_jsd_rows_torch


def _rows_fn(backend: str, x: torch.Tensor):
    return jsd_rows_triton if resolve_backend(backend, x) == "triton" else jsd_rows_torch


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    topk: int | None = None,
    tail: bool = True,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence between student and teacher token distributions.

    Args:
        student_logits: (N, V) (or (..., V)) logits; the only input that receives a gradient.
        teacher_logits: same shape; treated as a constant.
        alpha: 0 = forward KL(T||S), 1 = reverse KL(S||T), else (1-a) KL(S||M) + a KL(T||M), M = (1-a)S + aT
            (TRL GKD / Liger ``beta``).
        temperature: divides both logits before the softmax (the loss is not rescaled by temperature**2).
        teacher_temperature: if set, divides the teacher's logits instead of ``temperature`` (below 1 sharpens
            the teacher the student is pulled toward; the student stays at ``temperature``).
        topk: if set, the divergence is over the student's top-k entries (no gradient through the choice),
            plus one tail bucket with the remaining mass if ``tail`` else renormalised over the k entries.
            Computed with torch ops on every backend.
        weights: optional (N,) per-token weights, never differentiated: 0 masks a token, other values
            multiply its loss (importance weights).
        reduction: "none" -> (N,) weighted per-token losses; "sum"; "mean" = sum / number of tokens with
            non-zero weight (0 if there are none).
        backend: "auto" (Triton on CUDA when importable, else torch), "triton" (also on CPU tensors when
            TRITON_INTERPRET=1), or "torch".

    -inf logits are exact and never give NaN: an entry -inf in both distributions is absent. Where a KL
    would be infinite the offending entries are dropped from both distributions: for alpha=0 entries where
    the student is -inf (the teacher is renormalised over the student's support), for alpha=1 entries where
    the teacher is -inf (the student is renormalised over the teacher's support). 0<alpha<1 is always finite
    and exact. A row with no finite entry left contributes 0. The loss is float32 (float64 for float64).
    """
    check_args(alpha, temperature, reduction, backend, teacher_temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} differ")
    lead, v = student_logits.shape[:-1], student_logits.shape[-1]
    student = student_logits.reshape(-1, v)
    teacher = teacher_at_its_temperature(teacher_logits.detach().reshape(-1, v), temperature, teacher_temperature)
    if topk is not None:
        if int(topk) < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        rows_fn = partial(topk_jsd_rows_torch, topk=int(topk), tail=bool(tail))
    else:
        rows_fn = _rows_fn(backend, student)
    loss = GeneralizedJSDFunction.apply(student, teacher, weights, float(alpha), float(temperature), reduction,
                                        rows_fn)
    return loss.reshape(lead) if reduction == "none" else loss


def fused_linear_generalized_jsd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``generalized_jsd(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, ...)`` without
    ever holding the (N, V) logits.

    Args:
        student_hidden: (N, H) (or (..., H)); receives a gradient.
        student_weight: (V, H) output projection, no bias; receives a gradient (accumulated in float32).
        teacher_hidden: (N, H'), teacher_weight: (V, H'); constants.
        chunk_size: tokens per chunk; default from a memory budget (~512 MiB of chunk logits and temporaries).
        alpha, temperature, teacher_temperature, weights, reduction, backend: as in ``generalized_jsd`` (no
            top-k mode here).

    Gradients are computed during the forward pass for "sum"/"mean"; "none" recomputes the chunks in the
    backward pass instead (about 1.5x the time), since grad_weight depends on the incoming per-token grads.
    Under torch.autocast the four matrices are cast to the autocast dtype, as F.linear would be.
    """
    check_args(alpha, temperature, reduction, backend, teacher_temperature)
    h = student_hidden.shape[-1]
    lead = student_hidden.shape[:-1]
    hs = student_hidden.reshape(-1, h)
    ht = teacher_at_its_temperature(teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]), temperature,
                                    teacher_temperature)
    wt = teacher_weight.detach()
    if hs.shape[0] != ht.shape[0]:
        raise ValueError(f"student has {hs.shape[0]} tokens, teacher {ht.shape[0]}")
    if student_weight.shape[0] != wt.shape[0] or student_weight.shape[1] != h or wt.shape[1] != ht.shape[1]:
        raise ValueError(f"weights must be (V, H): student {tuple(student_weight.shape)} for H={h}, "
                         f"teacher {tuple(wt.shape)} for H={ht.shape[1]}")
    ws = student_weight
    if torch.is_autocast_enabled(hs.device.type):
        dtype = torch.get_autocast_dtype(hs.device.type)
        hs, ws, ht, wt = hs.to(dtype), ws.to(dtype), ht.to(dtype), wt.to(dtype)
    rows_fn = _rows_fn(backend, hs)
    if chunk_size is None:
        chunk_size = chunk_rows(hs.shape[0], student_weight.shape[0], hs.dtype, rows_fn is jsd_rows_torch)
    elif int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    loss = FusedLinearGeneralizedJSDFunction.apply(hs, ws, ht, wt, weights, float(alpha),
                                                   float(temperature), reduction, int(chunk_size), rows_fn)
    return loss.reshape(lead) if reduction == "none" else loss
