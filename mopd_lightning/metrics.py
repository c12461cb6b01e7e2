"""Validation metrics over k samples per prompt, as torchmetrics (they synchronise across ranks)."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: ``1 - C(n - c, k) / C(n, k)``."""
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


class PassAtK(Metric):
    """Mean over prompts of pass@k, from each prompt's number of samples and of correct ones."""

    full_state_update = False

    def __init__(self, k: int, **kwargs):
        super().__init__(**kwargs)
        self.k = k
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prompts", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, num_samples: torch.Tensor, num_correct: torch.Tensor) -> None:
        for n, c in zip(num_samples.tolist(), num_correct.tolist()):
            self.total += pass_at_k(int(n), int(c), self.k)
            self.prompts += 1

    def compute(self) -> torch.Tensor:
        return (self.total / self.prompts.clamp(min=1)).float()
