"""Argument checks, backend choice, per-token weights and chunk sizing shared by the ops."""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: importing mopd_kernels must need torch only.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

REDUCTIONS = ("none", "sum", "mean")
BACKENDS = ("auto", "triton", "torch")

# Working-memory budget of one chunk of rows (logits and float32 temporaries), in bytes.
DEFAULT_CHUNK_BYTES = 256 * 2**20

# log(0) stand-in: finite, so that 0 * NEG_LOG == 0 where 0 * -inf would be NaN.
NEG_LOG = -1e30


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (gradcheck); everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def log_floor(dtype: torch.dtype) -> float:
    """Just below log of the smallest subnormal: log(M) is never smaller unless M underflowed to 0."""
    return -746.0 if dtype == torch.float64 else -104.0


def interpreter_on() -> bool:
    """Whether Triton kernels run in the CPU interpreter. Triton decides when it is first imported, so
    TRITON_INTERPRET=1 set later has no effect: check what triton actually did."""
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("1", "true", "yes", "on"):
        return False
    if not HAS_TRITON:
        return False
    import triton.language as tl

    return type(tl.zeros).__name__ == "InterpretedFunction"


def check_args(alpha: float, temperature: float, reduction: str, backend: str,
               teacher_temperature: float | None = None) -> None:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if teacher_temperature is not None and not float(teacher_temperature) > 0.0:
        raise ValueError(f"teacher_temperature must be > 0 or None, got {teacher_temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """'auto' is Triton on CUDA (when importable) and torch elsewhere; 'triton' on CPU needs the interpreter."""
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if (HAS_TRITON and x.is_cuda and x.dtype != torch.float64) else "torch"
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package (pip install 'mopd-lightning[triton]')")
    if x.device.type == "cpu" and not interpreter_on():
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment "
                           "before triton is first imported")
    return "triton"


def row_weights(weights: torch.Tensor | None, n: int, reduction: str, device, dtype):
    """Return (w, coef): per-row loss weights, and the per-row gradient factor d(reduced loss)/d(loss_i).

    "mean" divides by the number of rows with non-zero weight (0 rows -> loss 0), without a host sync.
    """
    if weights is None:
        w = torch.ones(n, device=device, dtype=dtype)
    else:
        w = weights.detach().reshape(-1).to(device=device, dtype=dtype)
        if w.numel() != n:
            raise ValueError(f"weights must have one entry per token ({n}), got {tuple(weights.shape)}")
    if reduction == "mean":
        coef = w / (w != 0).sum().clamp_min(1).to(dtype)
    else:
        coef = w
    return w, coef


def rows_per_chunk(n_rows: int, bytes_per_row: int, budget: int | None = None) -> int:
    """Rows that fit the memory budget, clamped to [1, n_rows]; a multiple of 8 when large enough."""
    budget = DEFAULT_CHUNK_BYTES if budget is None else int(budget)
    rows = max(1, budget // max(1, bytes_per_row))
    if rows >= 16:
        rows -= rows % 8
    return max(1, min(rows, n_rows))


def teacher_at_its_temperature(teacher: torch.Tensor, temperature: float,
                               teacher_temperature: float | None) -> torch.Tensor:
    """The teacher's logits (or hidden states: logits are linear in them) rescaled so that dividing by
    ``temperature``, as every kernel does to both sides, divides them by ``teacher_temperature`` instead. Exact for
    -inf; the teacher is a constant, so the student's gradient needs nothing else."""
    if teacher_temperature is None or float(teacher_temperature) == float(temperature):
        return teacher
    return teacher * (float(temperature) / float(teacher_temperature))
