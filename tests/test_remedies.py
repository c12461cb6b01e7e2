"""The remedies for a teacher flatter than its student, as settings: each reaches the loss on every distillation
method, teacher kind and LoRA setting, fused or through the logits (the float64 checks of the loss itself are in
test_loss.py and tests/kernels)."""

import itertools

import pytest
import torch
from test_roles import KINDS, built, settings
from test_step import run

from mopd_lightning.config import LossConfig, PeerConfig
from mopd_lightning.loss import distillation_loss

DISTILLATION = ("mopd", "opd", "teacher_opd")
GRID = [(kind, method, lora, fused) for kind, method, lora, fused in
        itertools.product(KINDS, DISTILLATION, (False, True), (True, False))]


@pytest.fixture(scope="module")
def external_model(tmp_path_factory):
    from tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-external"), seed=7))


@pytest.mark.parametrize("kind,method,lora,fused", GRID)
def test_the_teacher_temperature_reaches_every_distillation_loss(tiny_model, external_model, monkeypatch, kind,
                                                                 method, lora, fused):
    """Each distillation call of a training step gets the teacher temperature, and on the same inputs it gives
    the loss of a sharper teacher: not the plain one, and the float64 formula with the teacher divided by 0.5."""
    import mopd_lightning.objectives as objectives

    calls = []

    def recording(*args):
        calls.append([a.detach().clone() if torch.is_tensor(a) else a for a in args])
        return distillation_loss(*args)

    monkeypatch.setattr(objectives, "distillation_loss", recording)
    loss = LossConfig(teacher_temperature=0.5, fused_linear=fused, topk=None if fused else 5, backend="torch")
    module = built(tiny_model, **{**settings(kind, method, lora, external_model), "loss": loss,
                                  "peers": PeerConfig(require_success=False)})
    run(module)
    assert calls, "no distillation loss was computed"
    for hidden, weight, teacher_hidden, teacher_weight, weights, config, *_ in calls:
        assert config.teacher_temperature == 0.5
        if not weights.any():
            continue
        sharp = distillation_loss(hidden, weight, teacher_hidden, teacher_weight, weights, config)
        plain = distillation_loss(hidden, weight, teacher_hidden, teacher_weight, weights,
                                  LossConfig(fused_linear=fused, topk=config.topk, backend="torch"))
        assert abs(float(sharp) - float(plain)) > 1e-6
        s = torch.log_softmax((hidden @ weight.T).double(), -1)
        t = torch.log_softmax((teacher_hidden @ teacher_weight.T).double() / 0.5, -1)
        if config.topk is None:  # alpha 0.5: the generalized JSD against the mixture
            m = torch.logsumexp(torch.stack([s, t]) + torch.tensor(0.5).log(), 0)
            per_token = 0.5 * (s.exp() * (s - m)).sum(-1) + 0.5 * (t.exp() * (t - m)).sum(-1)
            torch.testing.assert_close(sharp.double(), (per_token * weights.double()).sum(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind,method,lora", [(k, m, lora) for k, m, lora, fused in GRID if fused])
def test_the_sampled_token_estimate_trains_every_distillation_method(tiny_model, external_model, monkeypatch, kind,
                                                                    method, lora):
    """``model.loss.estimator: sampled_token`` reaches each distillation call with the step's sampled tokens, and its
    value there is the reverse-KL estimate: the student's minus the teacher's log-prob of those tokens."""
    import mopd_lightning.objectives as objectives
    from mopd_lightning.loss import token_logprobs

    calls = []

    def recording(*args):
        calls.append([a.detach().clone() if torch.is_tensor(a) else a for a in args])
        return distillation_loss(*args)

    monkeypatch.setattr(objectives, "distillation_loss", recording)
    loss = LossConfig(estimator="sampled_token", alpha=1.0, teacher_temperature=0.7)
    module = built(tiny_model, **{**settings(kind, method, lora, external_model), "loss": loss,
                                  "peers": PeerConfig(require_success=False)})
    trainer = run(module)
    assert calls and torch.isfinite(trainer.logged_metrics["train/loss"])
    for hidden, weight, teacher_hidden, teacher_weight, weights, config, tokens, contrast in calls:
        assert contrast is None
        assert config.estimator == "sampled_token" and tokens.shape[0] == hidden.shape[0]
        value = distillation_loss(hidden, weight, teacher_hidden, teacher_weight, weights, config, tokens)
        expected = (weights * (token_logprobs(hidden, weight, tokens)
                               - token_logprobs(teacher_hidden, teacher_weight, tokens, temperature=0.7))).sum()
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,method,lora", [(k, m, lora) for k, m, lora, fused in GRID if fused and m != "teacher_opd"])
def test_the_label_contrast_scores_the_teacher_again_under_swapped_labels(tiny_model, external_model, monkeypatch,
                                                                         kind, method, lora):
    """``model.loss.estimator: label_contrast``: each step builds its contexts twice, the second time with the
    labels swapped, the teacher scores both, and every distillation call gets both teachers' hidden states (which
    differ) and has the value sum of w (log T'(y) - log T(y)) at the loss temperature."""
    import mopd_lightning.module as module_code
    import mopd_lightning.objectives as objectives
    from mopd_lightning.loss import token_logprobs

    calls, built_with = [], []

    def recording(*args):
        calls.append([a.detach().clone() if torch.is_tensor(a) else a for a in args])
        return distillation_loss(*args)

    def contexts(*args, **kwargs):
        built_with.append(kwargs.get("swap_labels", False))
        return build(*args, **kwargs)

    build = module_code.build_teacher_contexts
    monkeypatch.setattr(objectives, "distillation_loss", recording)
    monkeypatch.setattr(module_code, "build_teacher_contexts", contexts)
    loss = LossConfig(estimator="label_contrast", alpha=1.0, teacher_temperature=0.7)
    module = built(tiny_model, **{**settings(kind, method, lora, external_model), "loss": loss,
                                  "peers": PeerConfig(require_success=False)})
    trainer = run(module)
    assert built_with == [False, True] and calls and torch.isfinite(trainer.logged_metrics["train/loss"])
    for hidden, weight, teacher_hidden, teacher_weight, weights, config, tokens, contrast_hidden in calls:
        assert contrast_hidden.shape == teacher_hidden.shape and not torch.equal(contrast_hidden, teacher_hidden)
        value = distillation_loss(hidden, weight, teacher_hidden, teacher_weight, weights, config, tokens,
                                  contrast_hidden)
        expected = (weights * (token_logprobs(contrast_hidden, teacher_weight, tokens, temperature=0.7)
                               - token_logprobs(teacher_hidden, teacher_weight, tokens, temperature=0.7))).sum()
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)


def test_the_label_contrast_is_refused_where_the_teacher_sees_no_peers():
    from mopd_lightning.config import ConfigError, GRPOConfig, TeacherConfig
    from mopd_lightning.methods import build_method

    loss = LossConfig(estimator="label_contrast", alpha=1.0)
    for method, peers in (("teacher_opd", PeerConfig()), ("mopd", PeerConfig(context="none"))):
        with pytest.raises(ConfigError, match="model.loss.estimator: label_contrast"):
            build_method(method, peers, TeacherConfig(), loss, GRPOConfig())
    assert build_method("opd", PeerConfig(), TeacherConfig(), loss, GRPOConfig()).contrasts_labels
