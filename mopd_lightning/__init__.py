"""Multi-Rollout On-Policy Distillation (MOPD) on PyTorch Lightning."""

from .data import PromptDataModule
from .module import MOPDModule

__all__ = ["MOPDModule", "PromptDataModule"]
