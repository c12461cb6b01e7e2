"""generalized_jsd against the float64 eager reference: values, gradients, masking, dtypes, backends."""

import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import (BACKENDS, TRITON_OK, assert_close_scaled, assert_matches_reference, device_for,
                            loss_and_grad)

from mopd_kernels import generalized_jsd
from mopd_kernels.chunked_jsd import jsd_rows_torch
from mopd_kernels.jsd import GeneralizedJSDFunction
from mopd_kernels.reference import generalized_jsd_reference

ALPHAS = [0.0, 0.25, 0.5, 1.0]
N, V = 8, 2500  # V is not a multiple of any block size


def make(n=N, v=V, dtype=torch.float32, device="cpu", scale=2.0):
    student = (torch.randn(n, v) * scale).to(dtype).to(device)
    teacher = (torch.randn(n, v) * scale + 0.5 * student.float().cpu()).to(dtype).to(device)
    return student, teacher


def mixed_weights(n=N, device="cpu"):
    w = torch.rand(n) * 2
    w[::3] = 0.0
    return w.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_matches_reference(backend, alpha, temperature, reduction):
    device = device_for(backend)
    student, teacher = make(device=device)
    upstream = torch.randn(N) if reduction == "none" else None
    assert_matches_reference(student, teacher, backend=backend, alpha=alpha, temperature=temperature,
                             reduction=reduction, weights=mixed_weights(device=device), upstream=upstream)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_several_vocab_blocks(backend, alpha):
    """V = 5000: one full 4096 block and a masked partial one (torch: several row chunks)."""
    device = device_for(backend)
    student, teacher = make(n=3, v=5000, device=device)
    assert_matches_reference(student, teacher, backend=backend, alpha=alpha, reduction="sum")


@pytest.mark.skipif(not TRITON_OK, reason="triton unavailable")
@pytest.mark.parametrize("alpha", ALPHAS)
def test_triton_small_blocks(alpha):
    """BLOCK=1024 over V=2500: three blocks, the last one partial, with zero-weight rows skipped."""
    from mopd_kernels.triton_jsd import jsd_rows_triton

    device = device_for("triton")
    student, teacher = make(n=4, device=device)
    weights = torch.tensor([1.0, 0.0, 0.5, 2.0], device=device)
    fn = partial(jsd_rows_triton, block=1024)
    s = student.clone().requires_grad_(True)
    loss = GeneralizedJSDFunction.apply(s, teacher, weights, alpha, 1.5, "sum", fn)
    loss.backward()
    ref_loss, ref_grad = loss_and_grad(generalized_jsd_reference, student.double().cpu(), teacher.double().cpu(),
                                       alpha=alpha, temperature=1.5, weights=weights.cpu(), reduction="sum")
    assert_close_scaled(loss.detach(), ref_loss, 1e-4)
    assert_close_scaled(s.grad, ref_grad, 1e-4)
    assert (s.grad[1] == 0).all()


@pytest.mark.parametrize("alpha", ALPHAS)
def test_torch_row_chunks_with_masked_rows(alpha):
    """A tiny memory budget: one row per chunk... and chunks mixing active and zero-weight rows."""
    student, teacher = make(n=7, v=300)
    weights = torch.tensor([0.0, 1.0, 0.0, 0.0, 3.0, 0.5, 0.0])
    for chunk_bytes in (1, 300 * 4 * 7 * 3):
        fn = partial(jsd_rows_torch, chunk_bytes=chunk_bytes)
        s = student.clone().requires_grad_(True)
        GeneralizedJSDFunction.apply(s, teacher, weights, alpha, 1.0, "mean", fn).backward()
        ref_loss, ref_grad = loss_and_grad(generalized_jsd_reference, student.double(), teacher.double(),
                                           alpha=alpha, weights=weights)
        assert_close_scaled(s.grad, ref_grad, 1e-4)


def _neg_inf_logits(pattern, device, n=6, v=2500):
    student, teacher = make(n=n, v=v)
    ninf = float("-inf")
    both = torch.rand(n, v) < 0.3
    if pattern in ("both", "mixed"):
        student[both] = ninf
        teacher[both] = ninf
    if pattern in ("student", "mixed"):
        student[torch.rand(n, v) < 0.2] = ninf
    if pattern in ("teacher", "mixed"):
        teacher[torch.rand(n, v) < 0.2] = ninf
    student[:, 0] = 5.0  # every row keeps some mass in common
    teacher[:, 0] = 5.0
    return student.to(device), teacher.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("pattern", ["both", "student", "teacher", "mixed"])
def test_neg_inf_logits(backend, alpha, pattern):
    student, teacher = _neg_inf_logits(pattern, device_for(backend))
    _, grad = assert_matches_reference(student, teacher, backend=backend, alpha=alpha, temperature=1.3,
                                       reduction="sum")
    assert (grad[torch.isneginf(student)] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_degenerate_rows_are_finite(backend, alpha):
    """Rows entirely -inf (in either model), masked or not, and disjoint supports: finite, never NaN."""
    device = device_for(backend)
    student, teacher = make(n=5, v=1500)
    ninf = float("-inf")
    student[0] = ninf  # fully banned student row, weight 1
    teacher[1] = ninf  # fully banned teacher row, weight 1
    student[2] = ninf  # garbage row, weight 0
    teacher[2] = ninf
    student[3, :750] = ninf  # disjoint supports
    teacher[3, 750:] = ninf
    weights = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0], device=device)
    student, teacher = student.to(device), teacher.to(device)
    loss, grad = loss_and_grad(generalized_jsd, student, teacher, torch.randn(5, device=device), alpha=alpha,
                               weights=weights, reduction="none", backend=backend)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert loss[2] == 0 and (grad[2] == 0).all()
    if alpha in (0.0, 1.0):  # the KL that would be infinite drops the offending entries: nothing left
        assert loss[3] == 0
    # the healthy row is unaffected by its neighbours
    ref = generalized_jsd_reference(student[4:].double().cpu(), teacher[4:].double().cpu(), alpha=alpha,
                                    reduction="none")
    assert_close_scaled(loss[4:], ref, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_half_precision_inputs(backend, dtype, alpha):
    student, teacher = make(dtype=dtype, device=device_for(backend))
    assert_matches_reference(student, teacher, backend=backend, alpha=alpha, reduction="mean", tol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_large_magnitude_logits(backend, alpha):
    student, teacher = make(device=device_for(backend), scale=1.0)
    student = (student * 1e4).clamp(-1e4, 1e4)
    teacher = (teacher * 1e4).clamp(-1e4, 1e4)
    assert_matches_reference(student, teacher, backend=backend, alpha=alpha, reduction="sum", tol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("topk", [1, 7, 100, V, V + 3])
@pytest.mark.parametrize("tail", [True, False])
def test_topk(backend, alpha, topk, tail):
    student, teacher = make(device=device_for(backend))
    assert_matches_reference(student, teacher, backend=backend, alpha=alpha, temperature=1.7, topk=topk,
                             tail=tail, weights=mixed_weights(device=device_for(backend)), reduction="mean")


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("tail", [True, False])
def test_topk_neg_inf(alpha, tail):
    """k larger than the student's support, -inf on either side: finite and as the reference."""
    student, teacher = _neg_inf_logits("mixed", "cpu", v=60)
    assert_matches_reference(student, teacher, alpha=alpha, topk=50, tail=tail, reduction="sum")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_over_no_active_token_is_zero(backend):
    device = device_for(backend)
    student, teacher = make(n=3, v=1100, device=device)
    loss, grad = loss_and_grad(generalized_jsd, student, teacher, weights=torch.zeros(3, device=device),
                               backend=backend)
    assert loss.item() == 0.0 and (grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_grad_and_double_backward_is_stable(backend):
    device = device_for(backend)
    student, teacher = make(n=3, v=1100, device=device)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss = generalized_jsd(student, teacher, backend=backend) * 3.0
    (g1,) = torch.autograd.grad(loss, student, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, student)
    torch.testing.assert_close(g1, g2)
    assert teacher.grad is None


def test_leading_dims_and_none_shape():
    student, teacher = make(n=6, v=50)
    out = generalized_jsd(student.view(2, 3, 50), teacher.view(2, 3, 50), reduction="none")
    assert out.shape == (2, 3)
    torch.testing.assert_close(out.flatten(), generalized_jsd(student, teacher, reduction="none"))


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("topk,tail", [(None, True), (3, True), (3, False)])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gradcheck_torch_path(alpha, topk, tail, reduction):
    student = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 9, dtype=torch.float64)
    teacher[0, 2] = float("-inf")
    weights = torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=torch.float64)

    def fn(s):
        return generalized_jsd(s, teacher, alpha=alpha, temperature=1.3, topk=topk, tail=tail, weights=weights,
                               reduction=reduction, backend="torch")

    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("temperature,teacher_temperature", [(1.0, 0.5), (2.5, 0.7), (1.0, 3.0)])
@pytest.mark.parametrize("topk", [None, 7])
def test_teacher_temperature_matches_reference(backend, alpha, temperature, teacher_temperature, topk):
    """The teacher at its own temperature (the student at ``temperature``), with -inf on both sides and masked
    rows, full vocabulary and top-k, as the float64 reference that divides the teacher's logits directly."""
    device = device_for(backend)
    student, teacher = _neg_inf_logits("mixed", device)
    assert_matches_reference(student, teacher, backend=backend, alpha=alpha, temperature=temperature,
                             teacher_temperature=teacher_temperature, topk=topk, reduction="sum",
                             weights=mixed_weights(n=student.shape[0], device=device))


def test_teacher_temperature_changes_only_the_teacher():
    """Positive control: a teacher temperature below 1 moves the loss (a sharper target), equal to
    ``temperature`` it is the plain loss; the reference agrees with a teacher whose logits were divided by hand."""
    student, teacher = make(n=4, v=300, dtype=torch.float64)
    plain = generalized_jsd(student, teacher, alpha=0.0, temperature=1.5, reduction="sum")
    same = generalized_jsd(student, teacher, alpha=0.0, temperature=1.5, teacher_temperature=1.5, reduction="sum")
    sharp = generalized_jsd(student, teacher, alpha=0.0, temperature=1.5, teacher_temperature=0.5, reduction="sum")
    assert same.item() == plain.item() and abs(sharp.item() - plain.item()) > 1e-3
    by_hand = (F.softmax(teacher / 0.5, -1) * (F.log_softmax(teacher / 0.5, -1) - F.log_softmax(student / 1.5, -1)))
    torch.testing.assert_close(sharp, by_hand.sum())


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 5), v=st.integers(2, 40), alpha=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
       temperature=st.floats(0.3, 4.0), seed=st.integers(0, 2**16))
def test_property_torch_matches_reference(n, v, alpha, temperature, seed):
    torch.manual_seed(seed)
    student = torch.randn(n, v, dtype=torch.float64) * 3
    teacher = torch.randn(n, v, dtype=torch.float64) * 3
    assert_matches_reference(student, teacher, alpha=alpha, temperature=temperature, reduction="sum", tol=1e-9)


def test_argument_errors_and_auto_backend():
    student, teacher = make(n=2, v=10)
    for bad in ({"alpha": 1.5}, {"temperature": 0.0}, {"teacher_temperature": 0.0}, {"reduction": "avg"}, {"backend": "cuda"}, {"topk": 0},
                {"weights": torch.ones(3)}):
        with pytest.raises(ValueError):
            generalized_jsd(student, teacher, **bad)
    with pytest.raises(ValueError):
        generalized_jsd(student, teacher[:, :5])
    from mopd_kernels.functional import _rows_fn

    assert _rows_fn("auto", student) is jsd_rows_torch  # CPU tensors: torch by default


def test_import_needs_only_torch():
    """With triton unimportable the package still imports and runs on torch; 'triton' says why it can't."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, mopd_kernels\n"
        "assert not mopd_kernels.HAS_TRITON\n"
        "s = torch.randn(3, 20, requires_grad=True); t = torch.randn(3, 20)\n"
        "mopd_kernels.generalized_jsd(s, t).backward()\n"
        "try:\n"
        "    mopd_kernels.generalized_jsd(s, t, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: backend='triton' needs the triton package" in out.stdout
