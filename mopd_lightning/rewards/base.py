"""What every verifier returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class Score:
    """A verifier's verdict on one rollout: a reward in [0, 1] and optional feedback for the teacher."""

    reward: float
    feedback: Optional[str] = None


Verifier = Callable[[str, Any], Score]
