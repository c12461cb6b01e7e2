"""Verifiers: score a model response against a ground truth, per domain.

``get_verifier(name)`` returns a callable ``(response, ground_truth) -> Score`` for ``"sci"``, ``"math"``,
``"code"`` and ``"tool"``; ``verify_batch`` scores many rollouts in parallel.
"""

from . import code, math, sci, tool  # noqa: F401  (each registers its verifier)
from .base import Score, Verifier, get_verifier, register_verifier
from .code import CodeVerifier
from .parallel import verify_batch
from .tool import ToolVerifier

__all__ = ["CodeVerifier", "Score", "ToolVerifier", "Verifier", "get_verifier", "register_verifier", "verify_batch"]
