"""Verifiers: score a model response against a ground truth, per domain.

``get_verifier(name)`` returns a callable ``(response, ground_truth) -> Score`` for ``"sci"``, ``"math"``,
``"code"``, ``"tool"`` and ``"named"`` (the table is :data:`registry.VERIFIERS`); ``verify_batch`` scores many
rollouts in parallel. Running code is :mod:`mopd_lightning.execution`'s business.
"""

from .base import Score, Verifier
from .code import CodeVerifier
from .parallel import verify_batch
from .registry import VERIFIERS, get_verifier
from .tool import ToolVerifier

__all__ = ["VERIFIERS", "CodeVerifier", "Score", "ToolVerifier", "Verifier", "get_verifier", "verify_batch"]
