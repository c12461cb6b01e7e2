"""Verifiers: score a model response against a ground truth, per domain."""

from . import mcq  # noqa: F401  (registers "mcq")
from .base import Score, Verifier, get_verifier, register_verifier

__all__ = ["Score", "Verifier", "get_verifier", "register_verifier"]
