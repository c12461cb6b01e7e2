"""Teacher kinds beyond a copy of the model: the trust region between the initial model and the live student."""

import pytest
import torch

from mopd_lightning import MOPDModule
from mopd_lightning.config import ConfigError, OptimConfig, TeacherConfig

from test_step import make, run, snapshot


def test_trust_region_logits_are_the_mixture_of_the_initial_and_the_live_models(tiny_model):
    module = MOPDModule(student=tiny_model, teacher=TeacherConfig(kind="trust_region", mix=0.3))
    module.setup("fit")
    module.configure_model()
    with torch.no_grad():  # the student moves away from its initial weights
        for p in module.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sequences = {0: [5, 9, 14, 3, 7, 21], 1: [8, 2, 30, 11]}
    lengths = {0: 3, 1: 2}
    hidden, head = module.score_teacher(sequences, lengths)
    for r, ids in sequences.items():
        inputs = torch.tensor([ids])
        with torch.no_grad():
            mixture = (0.7 * module.initial(inputs).logits + 0.3 * module.student(inputs).logits)[0].double()
        expected = mixture[len(ids) - lengths[r] - 1:-1]
        torch.testing.assert_close((hidden[r].double() @ head.double().T), expected, rtol=1e-4, atol=1e-4)


def test_a_trust_region_step_trains_the_student_and_keeps_the_initial_model(tiny_model):
    module = make(tiny_model, teacher=TeacherConfig(kind="trust_region"), optim=OptimConfig(lr=1e-2,
                                                                                              updates_per_batch=2))
    module.setup("fit")
    module.configure_model()
    initial = snapshot(module.initial)
    before = snapshot(module.student)
    trainer = run(module)
    assert all(torch.equal(initial[k], v) for k, v in module.initial.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in module.student.state_dict().items())
    assert torch.isfinite(trainer.logged_metrics["train/loss"])


def test_the_trust_region_mix_is_checked():
    with pytest.raises(ConfigError, match="model.teacher.mix"):
        TeacherConfig(kind="trust_region", mix=1.5)
