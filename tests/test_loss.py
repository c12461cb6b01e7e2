"""Token-level quantities (distillation loss, sampled-token log-probs, entropy) against float64 references
written directly from the definitions."""

import math

import pytest
import torch

from mopd_lightning.config import LossConfig
from mopd_lightning.loss import distillation_loss, entropy_and_logprobs, token_logprobs


def reference(student_logits, teacher_logits, alpha, temperature=1.0, topk=None, tail=True, teacher_temperature=None):
    """Row by row, in float64 probabilities: KL(P||Q) = sum p log(p/q)."""
    s = torch.softmax(student_logits.double() / temperature, -1)
    t = torch.softmax(teacher_logits.double() / (teacher_temperature or temperature), -1)
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


def make_inputs(n=7, v=50, h=8, seed=0):
    torch.manual_seed(seed)
    hidden = (torch.randn(n, h)).requires_grad_()
    weight = (torch.randn(v, h) * 0.8).requires_grad_()
    return hidden, weight, torch.randn(n, h), torch.randn(v, h) * 0.8


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("topk,tail,fused", [(None, True, True), (None, True, False), (5, True, True), (5, False, False)])
@pytest.mark.parametrize("temperature,teacher_temperature", [(1.0, None), (2.0, None), (1.0, 0.5), (2.0, 0.7)])
def test_loss_matches_float64_reference(alpha, topk, tail, fused, temperature, teacher_temperature):
    hidden, weight, teacher_hidden, teacher_weight = make_inputs()
    weights = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    config = LossConfig(alpha=alpha, temperature=temperature, teacher_temperature=teacher_temperature, topk=topk,
                        tail=tail, fused_linear=fused, backend="torch")
    loss = distillation_loss(hidden, weight, teacher_hidden, teacher_weight, weights, config)
    hidden64 = hidden.detach().double().requires_grad_()
    weight64 = weight.detach().double().requires_grad_()
    keep = weights.bool()
    per_token = reference(hidden64 @ weight64.T, (teacher_hidden @ teacher_weight.T).double(), alpha, temperature,
                          topk, tail, teacher_temperature)
    expected = per_token[keep].sum()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-4, atol=1e-6)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(hidden.grad.double(), hidden64.grad, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), weight64.grad, rtol=1e-3, atol=1e-6)
    assert hidden.grad[~keep].abs().max() == 0  # masked tokens get no gradient


@pytest.mark.parametrize("teacher_temperature", [None, 0.5])
def test_the_sampled_token_estimate_is_reverse_kl_on_the_sampled_token_with_its_score_function_gradient(
        teacher_temperature):
    """Value: sum of w (log S(y) - log T(y)); gradient: sum of w (log S(y) - log T(y)) grad log S(y), both against float64
    formulas; a masked token contributes neither. Its expectation over y ~ S is the full reverse KL (checked
    exactly, by summing over every token of the vocabulary weighted by S)."""
    hidden, weight, teacher_hidden, teacher_weight = make_inputs()
    tokens = torch.tensor([3, 7, 0, 49, 12, 5, 5])
    weights = torch.tensor([1.0, 0.0, 1.0, 2.0, 0.0, 1.0, 0.5])
    config = LossConfig(estimator="sampled_token", alpha=1.0, teacher_temperature=teacher_temperature)
    loss = distillation_loss(hidden, weight, teacher_hidden, teacher_weight, weights, config, tokens)
    loss.backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    log_s = torch.log_softmax(h64 @ w64.T, -1)
    log_t = torch.log_softmax((teacher_hidden @ teacher_weight.T).double() / (teacher_temperature or 1.0), -1)
    picked_s, picked_t = log_s.gather(-1, tokens[:, None])[:, 0], log_t.gather(-1, tokens[:, None])[:, 0]
    ratio = (picked_s - picked_t).detach()
    torch.testing.assert_close(loss.double(), (weights.double() * ratio).sum(), rtol=1e-5, atol=1e-6)
    (weights.double() * ratio * picked_s).sum().backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
    assert hidden.grad[weights == 0].abs().max() == 0
    # unbiased: E_{y ~ S}[log S(y) - log T(y)] is KL(S || T), the full-vocabulary loss at alpha 1
    every = torch.arange(log_s.shape[1])
    expectation = sum(log_s.exp()[:, y] * (log_s[:, y] - log_t[:, y]) for y in every)
    full = LossConfig(alpha=1.0, teacher_temperature=teacher_temperature, backend="torch")
    kl = distillation_loss(hidden.detach(), weight.detach(), teacher_hidden, teacher_weight, torch.ones(7), full)
    torch.testing.assert_close(expectation.sum().float(), kl, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("teacher_temperature", [None, 0.7])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_label_contrast_is_the_difference_of_two_reverse_kls_on_the_sampled_token(temperature,
                                                                                   teacher_temperature):
    """Value: sum of w (log T'(y) - log T(y)), T' the teacher under swapped labels; gradient: the same times
    grad log S(y), against float64 formulas; a masked token contributes neither, a -inf teacher logit on an
    unsampled token changes nothing. It is the sampled-token estimate under T minus the one under T' (log S
    cancels), and in expectation over y ~ S the full KL(S || T) - KL(S || T'). Identical teachers: zero loss and
    zero gradient, whatever the student."""
    hidden, weight, teacher_hidden, teacher_weight = make_inputs()
    contrast_hidden = torch.randn(7, 8)
    tokens = torch.tensor([3, 7, 0, 49, 12, 5, 5])
    weights = torch.tensor([1.0, 0.0, 1.0, 2.0, 0.0, 1.0, 0.5])
    plain_weight, plain_hidden = teacher_weight, (teacher_hidden, contrast_hidden)
    ruled_out = torch.zeros(50, 1)
    ruled_out[20] = -math.inf  # a token both teachers rule out (a -inf logit), never sampled
    teacher_weight = torch.cat([teacher_weight, ruled_out], 1)
    teacher_hidden, contrast_hidden = (torch.cat([h, torch.ones(7, 1)], 1) for h in plain_hidden)
    config = LossConfig(estimator="label_contrast", alpha=1.0, temperature=temperature,
                        teacher_temperature=teacher_temperature)
    loss = distillation_loss(hidden, weight, teacher_hidden, teacher_weight, weights, config, tokens, contrast_hidden)
    loss.backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    log_s = torch.log_softmax(h64 @ w64.T / temperature, -1)
    scale = teacher_temperature or temperature
    log_t = torch.log_softmax((teacher_hidden @ teacher_weight.T).double() / scale, -1)
    log_c = torch.log_softmax((contrast_hidden @ teacher_weight.T).double() / scale, -1)
    at = tokens[:, None]
    contrast = (log_c.gather(-1, at) - log_t.gather(-1, at))[:, 0]
    torch.testing.assert_close(loss.double(), (weights.double() * contrast).sum(), rtol=1e-5, atol=1e-6)
    (weights.double() * contrast * log_s.gather(-1, at)[:, 0]).sum().backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
    assert hidden.grad[weights == 0].abs().max() == 0
    sampled = LossConfig(estimator="sampled_token", alpha=1.0, temperature=temperature,
                         teacher_temperature=teacher_temperature)
    under = [distillation_loss(hidden.detach(), weight.detach(), h, teacher_weight, weights, sampled, tokens)
             for h in (teacher_hidden, contrast_hidden)]
    torch.testing.assert_close(loss.detach(), under[0] - under[1], rtol=1e-4, atol=1e-5)
    # unbiased (with a teacher that rules nothing out, so both KLs are finite)
    log_t, log_c = (torch.log_softmax((h @ plain_weight.T).double() / scale, -1) for h in plain_hidden)
    expectation = sum(log_s.exp().detach()[:, y] * (log_c[:, y] - log_t[:, y]) for y in range(log_s.shape[1]))
    full = LossConfig(alpha=1.0, temperature=temperature, teacher_temperature=teacher_temperature, backend="torch")
    kls = [distillation_loss(hidden.detach(), weight.detach(), h, plain_weight, weights, full) for h in plain_hidden]
    torch.testing.assert_close((weights.double() * expectation).sum().float(), kls[0] - kls[1], rtol=1e-4, atol=1e-4)
    hidden.grad = None
    same = distillation_loss(hidden, weight, teacher_hidden, teacher_weight, weights, config, tokens, teacher_hidden)
    same.backward()
    assert float(same.detach()) == 0 and hidden.grad.abs().max() == 0


@pytest.mark.parametrize("estimator", ["sampled_token", "label_contrast"])
@pytest.mark.parametrize("settings", [dict(alpha=0.5), dict(alpha=1.0, topk=100)])
def test_the_sampled_token_estimates_refuse_what_they_do_not_estimate(estimator, settings):
    with pytest.raises(Exception, match=f"model.loss.estimator: {estimator}"):
        LossConfig(estimator=estimator, **settings)


def test_the_label_contrast_needs_the_teacher_under_swapped_labels():
    hidden, weight, teacher_hidden, teacher_weight = make_inputs()
    config = LossConfig(estimator="label_contrast", alpha=1.0)
    with pytest.raises(ValueError, match="swapped labels"):
        distillation_loss(hidden, weight, teacher_hidden, teacher_weight, torch.ones(7), config, torch.zeros(7).long())


def test_fused_and_unfused_paths_agree():
    hidden, weight, teacher_hidden, teacher_weight = make_inputs(n=33, v=300, h=16, seed=3)
    weights = torch.rand(33)
    results = []
    for fused in (True, False):
        config = LossConfig(fused_linear=fused, backend="torch")
        loss = distillation_loss(hidden, weight, teacher_hidden, teacher_weight, weights, config)
        grads = torch.autograd.grad(loss, (hidden, weight))
        results.append((loss, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_divergence_is_zero_for_equal_distributions_and_jsd_is_bounded():
    hidden, weight, _, _ = make_inputs()
    ones = torch.ones(7)
    for alpha in (0.0, 0.5, 1.0):
        loss = distillation_loss(hidden, weight, hidden.detach(), weight.detach(), ones, LossConfig(alpha=alpha))
        assert abs(loss.item()) < 1e-5
    one = torch.ones(1, 1)  # H = 1: the logits are the weights, [30, -30] against [-30, 30]
    jsd = distillation_loss(one, torch.tensor([[30.0], [-30.0]]), one, torch.tensor([[-30.0], [30.0]]),
                               torch.ones(1), LossConfig())
    assert jsd.item() == pytest.approx(math.log(2), rel=1e-4)


def test_token_logprobs_and_entropy_match_float64():
    hidden, weight, _, _ = make_inputs()
    tokens = torch.randint(0, 50, (7,))
    log_p = torch.log_softmax(hidden.double() @ weight.double().T, -1)
    expected = log_p.gather(-1, tokens[:, None])[:, 0]
    got = token_logprobs(hidden, weight, tokens, chunk=3)  # differentiable, each chunk recomputed in backward
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(torch.autograd.grad(got.sum(), (hidden, weight)), torch.autograd.grad(expected.sum(), (hidden, weight))):
        torch.testing.assert_close(g.double(), e.double(), rtol=1e-4, atol=1e-6)
    entropy, logp = entropy_and_logprobs(hidden, weight, tokens, chunk=3)
    torch.testing.assert_close(logp.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entropy.double(), -(log_p.exp() * log_p).sum(-1).detach(), rtol=1e-4, atol=1e-6)


def test_the_references_step_level_kl_is_the_token_level_loss():
    """The paper's code's ``step_level_kl``: steps end after each blank-line token, each step's mean token loss
    (over its unmasked tokens) replaces its tokens' losses before the token mean. A step's mean times its token
    count is its sum, so loss and gradient are the token-level ones: no setting of ours reproduces it, none is
    needed (README, the reference's options)."""
    generator = torch.Generator().manual_seed(0)
    divergence = torch.rand(3, 12, generator=generator, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 12, dtype=torch.float64)
    mask[0, 9:] = 0  # a short response
    mask[2, 4] = 0  # a token masked inside a step
    blank = torch.zeros(3, 12, dtype=torch.bool)
    blank[0, 3], blank[1, [2, 5, 6]], blank[2, 8] = True, True, True  # "\n\n" tokens close their step
    steps = blank.long().cumsum(-1) - blank.long()  # a separator belongs to the step it closes

    def token_mean(loss):
        return (loss * mask).sum() / mask.sum()

    plain = token_mean(divergence)
    plain_grad, = torch.autograd.grad(plain, divergence)
    per_step = torch.zeros_like(divergence)
    for row in range(3):
        for step in steps[row].unique():
            inside = (steps[row] == step) & (mask[row] > 0)
            if inside.any():
                per_step[row, inside] = divergence[row, inside].sum() / inside.sum()
    stepped = token_mean(per_step)
    stepped_grad, = torch.autograd.grad(stepped, divergence)
    assert float(stepped) == pytest.approx(float(plain), rel=1e-12)
    torch.testing.assert_close(stepped_grad, plain_grad, rtol=1e-12, atol=1e-15)
