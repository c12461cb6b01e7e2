"""The real path: the embedded demo model (SmolLM2-135M-Instruct) for one MOPD step. Slow; CI runs it."""

import pytest
import torch

from mopd_lightning import MOPDModule, PromptDataModule
from mopd_lightning.config import OptimConfig, SamplingConfig

pytestmark = pytest.mark.slow


def test_one_step_on_the_demo_model():
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from mopd_lightning.data.datamodule import PromptStream

    data = PromptDataModule(batch_size=2)
    data.setup("fit")
    module = MOPDModule(student="demo", sampling=SamplingConfig(group_size=2, max_new_tokens=24),
                        optim=OptimConfig(lr=1e-5))
    module.setup("fit")
    module.configure_model()
    before = module.student.model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(PromptStream(data.datasets["train"], 2, 0, True), batch_size=None))
    metrics = trainer.logged_metrics
    assert torch.isfinite(metrics["train/loss"]) and metrics["train/active_fraction"] > 0
    assert not torch.equal(before, module.student.model.layers[0].mlp.up_proj.weight)
    text = module.tokenizer.decode(module.render([{"role": "user", "content": "Hi"}]))
    assert text.endswith("<|im_start|>assistant\n")
