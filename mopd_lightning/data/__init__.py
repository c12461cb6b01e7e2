"""Prompt datasets: domains, sources, and the Lightning datamodule."""

from .datamodule import PromptDataModule
from .example import DataError, Example

__all__ = ["DataError", "Example", "PromptDataModule"]
