"""What every verifier returns, and the registry that maps a domain name to its verifier."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional


@dataclass(frozen=True)
class Score:
    """A verifier's verdict on one rollout: a reward in [0, 1] and optional feedback for the teacher."""

    reward: float
    feedback: Optional[str] = None


Verifier = Callable[[str, Any], Score]
_VERIFIERS: Dict[str, Callable[[], Verifier]] = {}


def register_verifier(name: str):
    """Register a zero-argument factory that builds the verifier for domain ``name``."""

    def decorate(factory):
        _VERIFIERS[name] = factory
        return factory

    return decorate


def get_verifier(name: str) -> Verifier:
    """The verifier for domain ``name`` (``"mcq"``, ``"math"``, ``"code"``, ``"tool"``)."""
    if name not in _VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}; known: {sorted(_VERIFIERS)}")
    return _VERIFIERS[name]()
