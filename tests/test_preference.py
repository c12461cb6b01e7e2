"""The preference baselines (dpo, simpo): their pairs, loss and gradient against the reference's formula in float64,
whatever the micro-batching, and a step of each in the shared loop."""

import pytest
import torch
import torch.nn.functional as F

from mopd_lightning.config import ConfigError, OptimConfig, PreferenceConfig, VLLMConfig
from mopd_lightning.objectives import MicroBatch, PairwisePreference, TrainingSignal
from mopd_lightning.rollouts import Rollouts

REWARDS = [1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0]  # group 0: five rollouts (graded); group 1: no contrast
GROUPS = [0, 0, 0, 0, 0, 1, 1, 1]
LENGTHS = [3, 5, 2, 4, 6, 3, 2, 4]


def group_rollouts():
    responses = [[1] * n for n in LENGTHS]
    rollouts = Rollouts(GROUPS, [[0]] * len(GROUPS), responses, [""] * len(GROUPS), [True] * len(GROUPS))
    rollouts.reward = list(REWARDS)
    return rollouts


def reference_loss(logp, reference, kind, config):
    """The paper's code (``compute_preference_loss``): every ordered pair with r_a > r_b; DPO's h the summed
    log-prob minus the reference's, SimPO's the mean log-prob; the mean over pairs of the smoothed logistic loss."""
    h = []
    for r, part in enumerate(logp.split(LENGTHS)):
        h.append(part.sum() - reference[r].sum() if kind == "dpo" else part.sum() / len(part))
    beta = config.dpo_beta if kind == "dpo" else config.simpo_beta
    gamma = 0.0 if kind == "dpo" else config.simpo_gamma
    eps = config.label_smoothing
    z = [beta * (h[a] - h[b]) - gamma
         for a in range(len(h)) for b in range(len(h)) if GROUPS[a] == GROUPS[b] and REWARDS[a] > REWARDS[b]]
    losses = [-(1 - eps) * F.logsigmoid(v) - eps * F.logsigmoid(-v) for v in z]
    return torch.stack(losses).mean(), len(losses)


@pytest.mark.parametrize("kind,config", [("dpo", PreferenceConfig()), ("dpo", PreferenceConfig(label_smoothing=0.2)),
                                         ("simpo", PreferenceConfig()),
                                         ("simpo", PreferenceConfig(simpo_beta=1.0, simpo_gamma=0.3,
                                                                    label_smoothing=0.1))])
@pytest.mark.parametrize("split", [[list(range(5))], [[0, 2], [1, 3, 4]], [[4], [0], [1, 2, 3]]])
def test_pair_loss_and_gradient_equal_the_references_whatever_the_micro_batches(kind, config, split):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (sum(LENGTHS),), generator=generator)
    hidden = torch.randn(sum(LENGTHS), 6, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, generator=generator, dtype=torch.float64)
    reference = [torch.randn(n, generator=generator, dtype=torch.float64) - 2 for n in LENGTHS]

    logp = (hidden @ weight.T).log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
    expected, pairs = reference_loss(logp, reference, kind, config)
    expected.backward()
    expected_grad, hidden.grad = hidden.grad.clone(), None

    objective = PairwisePreference(kind, config)
    signal = TrainingSignal(reference_logp=dict(enumerate(reference)) if kind == "dpo" else {})
    rollouts = group_rollouts()
    signal.pairs = objective.pairs(rollouts, {r: p.detach() for r, p in enumerate(logp.split(LENGTHS)) if r < 5},
                                   signal.reference_logp)
    rows, counted = objective.rows(rollouts, signal)
    assert rows == [0, 1, 2, 3, 4] and objective.tokens(rollouts, signal, counted) == pairs == 8
    starts = [sum(LENGTHS[:r]) for r in range(len(LENGTHS))]
    total = 0.0
    for chosen in split:
        index = torch.tensor([starts[r] + k for r in chosen for k in range(LENGTHS[r])])
        batch = MicroBatch(chosen, hidden[index], weight, tokens[index], [LENGTHS[r] for r in chosen])
        loss = objective.loss_sum(batch, signal) / signal.pairs.count
        loss.backward()
        total += float(loss)
    # the loop's log-probabilities are float32 (as in training): agreement to float32 precision
    assert total == pytest.approx(float(expected), rel=1e-6)
    torch.testing.assert_close(hidden.grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_pairs_are_the_ordered_pairs_with_a_higher_reward():
    objective = PairwisePreference("simpo", PreferenceConfig())
    logp = {r: torch.full((n,), -1.0) for r, n in enumerate(LENGTHS) if r < 5}
    pairs = objective.pairs(group_rollouts(), logp, {})
    # 1.0 beats 0.5, 0.0, 0.0 (twice over: two winners); 0.5 beats the two zeros: 3 + 3 + 2; equal rewards never pair
    assert pairs.count == 8 and sorted(pairs.slope) == [0, 1, 2, 3, 4]
    assert pairs.accuracy == 0.0 and pairs.margin == 0.0  # equal h: z = -gamma < 0 everywhere


@pytest.mark.parametrize("method", ["dpo", "simpo"])
def test_a_preference_step_trains_in_the_shared_loop(tiny_model, method):
    from test_step import make, run

    module = make(tiny_model, method=method)
    trainer = run(module, steps=2)
    metrics = trainer.callback_metrics
    assert float(metrics["train/preference_pairs"]) > 0 and float(metrics["train/grad_norm"]) > 0
    assert ("initial" in module.roles.copies) == (method == "dpo")  # DPO's reference: the frozen initial student
    assert module.teacher is None  # no teacher pass


def test_preference_settings_that_cannot_hold_are_refused(tiny_model):
    from mopd_lightning import MOPDModule

    with pytest.raises(ConfigError, match="model.optim.updates_per_batch"):
        MOPDModule(student=tiny_model, method="dpo", optim=OptimConfig(updates_per_batch=2))
    with pytest.raises(ConfigError, match="model.vllm.importance_sampling"):
        MOPDModule(student=tiny_model, method="simpo", vllm=VLLMConfig(importance_sampling="token_mask"))
    with pytest.raises(ConfigError, match="model.preference.label_smoothing"):
        PreferenceConfig(label_smoothing=0.5)
