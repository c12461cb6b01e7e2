"""What every verifier returns, and the registry that maps a domain name to its verifier."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional


@dataclass(frozen=True)
class Score:
    """A verifier's verdict on one rollout: a reward in [0, 1] and optional feedback for the teacher."""

    reward: float
    feedback: Optional[str] = None


Verifier = Callable[[str, Any], Score]
_VERIFIERS: Dict[str, Callable[..., Verifier]] = {}


def register_verifier(name: str):
    """Register a factory that builds the verifier for domain ``name``.

    The factory may take ``strict`` (bool): then it is told whether only the answer format the prompt asks for
    counts (``model.verifier.strict``); a factory without that argument verifies one way.
    """

    def decorate(factory):
        _VERIFIERS[name] = factory
        return factory

    return decorate


def get_verifier(name: str, strict: bool = True) -> Verifier:
    """The verifier for domain ``name`` (``"sci"``, ``"math"``, ``"code"``, ``"tool"``)."""
    if name not in _VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}; known: {sorted(_VERIFIERS)}")
    factory = _VERIFIERS[name]
    if "strict" in inspect.signature(factory).parameters:
        return factory(strict=strict)
    return factory()
