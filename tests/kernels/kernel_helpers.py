"""Compare mopd_kernels against the float64 eager reference, forward and backward."""

import pytest
import torch

from mopd_kernels import HAS_TRITON, generalized_jsd
from mopd_kernels._common import interpreter_on
from mopd_kernels.reference import generalized_jsd_reference

TRITON_OK = HAS_TRITON and (torch.cuda.is_available() or interpreter_on())
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_OK, reason="triton missing, or imported before TRITON_INTERPRET=1 on a CPU-only machine "
                          "(run `TRITON_INTERPRET=1 pytest tests/kernels`)"))]


def device_for(backend: str) -> str:
    """Triton runs on CUDA when there is one, else on CPU tensors under the interpreter."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def loss_and_grad(fn, student, teacher, upstream=None, **kwargs):
    """Run fn on a fresh leaf copy of student; backprop `upstream` (for reduction='none') or 1."""
    s = student.detach().clone().requires_grad_(True)
    loss = fn(s, teacher, **kwargs)
    (loss * upstream).sum().backward() if upstream is not None else loss.backward()
    return loss.detach(), s.grad


def assert_close_scaled(actual, expected, tol):
    """|actual - expected| <= tol * max|expected| elementwise: a scale-free tolerance."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.double().cpu(), expected, atol=tol * max(scale, 1e-12), rtol=0.0)


def assert_matches_reference(student, teacher, *, backend="torch", tol=1e-4, upstream=None, **kwargs):
    """generalized_jsd on the inputs as given vs the reference on float64 CPU copies of the same values."""
    loss, grad = loss_and_grad(generalized_jsd, student, teacher,
                               None if upstream is None else upstream.to(student.device), backend=backend, **kwargs)
    ref_loss, ref_grad = loss_and_grad(generalized_jsd_reference, student.double().cpu(), teacher.double().cpu(),
                                       None if upstream is None else upstream.double().cpu(),
                                       **{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kwargs.items()})
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert grad.dtype == student.dtype and grad.shape == student.shape
    assert_close_scaled(loss, ref_loss, tol)
    assert_close_scaled(grad, ref_grad, tol)
    return loss, grad
