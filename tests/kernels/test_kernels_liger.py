"""Liger-Kernel's losses as ``benchmarks/bench_kernels.py`` calls them (the GPU check's comparison) compute the same
thing as ours: checked against the float64 reference, forward and backward, on the CPU under Triton's interpreter."""

import sys
from pathlib import Path

import pytest
import torch
from kernel_helpers import assert_close_scaled, device_for

from mopd_kernels._common import interpreter_on
from mopd_kernels.reference import fused_linear_generalized_jsd_reference, generalized_jsd_reference

pytest.importorskip("liger_kernel")
pytestmark = [pytest.mark.skipif(not (torch.cuda.is_available() or interpreter_on()),
                                 reason="Liger's Triton kernels need a GPU or TRITON_INTERPRET=1"),
              # Liger's masked vocabulary lanes compute -inf - -inf; numpy says so under the interpreter
              pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")]
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_kernels import liger_loss  # noqa: E402

ALPHAS = [0.0, 0.3, 0.5, 1.0]


def _grads(fn, inputs, wanted):
    leaves = [x.detach().clone().requires_grad_(i in wanted) for i, x in enumerate(inputs)]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [leaves[i].grad for i in wanted]


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_liger_jsd_is_our_generalized_jsd(alpha, temperature):
    device = device_for("triton")
    student, teacher = (torch.randn(6, 1000) * 3).to(device), (torch.randn(6, 1000) * 3).to(device)
    loss, (grad,) = _grads(liger_loss("jsd", alpha, temperature), [student, teacher], [0])
    ref_loss, (ref_grad,) = _grads(lambda s, t: generalized_jsd_reference(s, t, alpha=alpha, temperature=temperature),
                                   [student.double().cpu(), teacher.double().cpu()], [0])
    assert_close_scaled(loss, ref_loss, 1e-5)
    assert_close_scaled(grad, ref_grad, 1e-5)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_liger_fused_linear_jsd_is_ours(alpha):
    device = device_for("triton")
    inputs = [torch.randn(6, 16), torch.randn(1000, 16) * 0.5, torch.randn(6, 16), torch.randn(1000, 16) * 0.5]
    loss, grads = _grads(liger_loss("fused", alpha, 1.0), [x.to(device) for x in inputs], [0, 1])
    ref_loss, ref_grads = _grads(lambda *xs: fused_linear_generalized_jsd_reference(*xs, alpha=alpha),
                                 [x.double() for x in inputs], [0, 1])
    assert_close_scaled(loss, ref_loss, 1e-5)
    for grad, ref_grad in zip(grads, ref_grads):
        assert_close_scaled(grad, ref_grad, 1e-5)
