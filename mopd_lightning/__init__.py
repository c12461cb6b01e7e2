"""Multi-Rollout On-Policy Distillation (MOPD) on PyTorch Lightning.

``MOPDModule`` and ``PromptDataModule`` are imported on first use, so that light submodules (the verifiers,
which also run in worker processes) do not pay for importing Lightning.
"""

__all__ = ["MOPDModule", "PromptDataModule"]


def __getattr__(name: str):
    if name == "MOPDModule":
        from .module import MOPDModule

        return MOPDModule
    if name == "PromptDataModule":
        from .data import PromptDataModule

        return PromptDataModule
    raise AttributeError(f"module 'mopd_lightning' has no attribute {name!r}")
