"""The plain-PyTorch distillation loss against a float64 reference written directly from the definitions."""

import math

import pytest
import torch

from mopd_lightning.config import LossConfig
from mopd_lightning.loss import distillation_loss, token_divergence


def reference(student_logits, teacher_logits, alpha, temperature=1.0, topk=None, tail=True):
    """Row by row, in float64 probabilities: KL(P||Q) = sum p log(p/q)."""
    s = torch.softmax(student_logits.double() / temperature, -1)
    t = torch.softmax(teacher_logits.double() / temperature, -1)
    if topk is not None:
        idx = s.detach().topk(topk, -1).indices
        s_k, t_k = s.gather(-1, idx), t.gather(-1, idx)
        if tail:
            s = torch.cat([s_k, 1 - s_k.sum(-1, keepdim=True)], -1)
            t = torch.cat([t_k, 1 - t_k.sum(-1, keepdim=True)], -1)
        else:
            s, t = s_k / s_k.sum(-1, keepdim=True), t_k / t_k.sum(-1, keepdim=True)

    def kl(p, q):
        return (p * (p / q).log()).sum(-1)

    if alpha == 0:
        return kl(t, s)
    if alpha == 1:
        return kl(s, t)
    m = (1 - alpha) * s + alpha * t
    return (1 - alpha) * kl(s, m) + alpha * kl(t, m)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("topk,tail", [(None, True), (5, True), (5, False)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_divergence_matches_float64_reference(alpha, topk, tail, temperature):
    torch.manual_seed(0)
    student = (torch.randn(7, 50) * 3).requires_grad_()
    teacher = torch.randn(7, 50) * 3
    ours = token_divergence(student, teacher, alpha, temperature, topk, tail)
    student64 = student.detach().double().requires_grad_()
    ref = reference(student64, teacher, alpha, temperature, topk, tail)
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-4, atol=1e-6)
    upstream = torch.rand(7)
    ours.backward(upstream)
    ref.backward(upstream.double())
    torch.testing.assert_close(student.grad.double(), student64.grad, rtol=1e-3, atol=1e-6)


def test_divergence_is_zero_for_equal_distributions_and_positive_otherwise():
    logits = torch.randn(4, 30)
    for alpha in (0.0, 0.5, 1.0):
        assert token_divergence(logits, logits, alpha).abs().max() < 1e-6
        assert (token_divergence(logits, logits + torch.randn(4, 30), alpha) > 0).all()


def test_jsd_is_bounded_by_log2():
    student = torch.tensor([[50.0, -50.0]])
    teacher = torch.tensor([[-50.0, 50.0]])
    assert token_divergence(student, teacher, 0.5).item() == pytest.approx(math.log(2), rel=1e-4)


def test_masked_tokens_add_nothing_and_get_no_gradient():
    torch.manual_seed(1)
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(40, 8, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(6, 8), torch.randn(40, 8)
    weights = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    loss, _ = distillation_loss(hidden, weight, teacher_hidden, teacher_weight, weights, LossConfig())
    loss.backward()
    assert hidden.grad[weights == 0].abs().max() == 0
    keep = weights.bool()
    expected = reference(hidden[keep] @ weight.T, teacher_hidden[keep] @ teacher_weight.T, 0.5).sum()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-4, atol=1e-6)


def test_neg_inf_teacher_logits_give_finite_loss_and_gradients():
    student = torch.randn(3, 10, requires_grad=True)
    teacher = torch.randn(3, 10)
    teacher[:, :3] = float("-inf")
    for alpha in (0.0, 0.5, 1.0):
        loss = token_divergence(student, teacher, alpha).sum()
        if alpha == 1.0:  # reverse KL is infinite where the student has mass and the teacher has none
            assert torch.isinf(loss)
            continue
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
        student.grad = None
