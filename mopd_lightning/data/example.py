"""The unit of training data: one prompt with the ground truth its rollouts are verified against."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List


@dataclass
class Example:
    """One prompt. ``messages`` are chat messages (optional system turns, then the user question)."""

    id: str
    messages: List[Dict[str, str]]
    ground_truth: Any
    verifier: str
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> str:
        """The last user turn: what the teacher context restates before the peers."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    @property
    def system_messages(self) -> List[Dict[str, str]]:
        return [m for m in self.messages if m["role"] == "system"]


class DataError(ValueError):
    """A dataset row or file that cannot be used; the message names the file and the row."""


class UnusedRow(Exception):
    """A well-formed row of a kind the domain's verifier cannot score (e.g. SciKnowEval ``open-ended-qa``).

    Not an error: the datamodule leaves the row out and counts it under ``kind``, so a mixed release loads whole
    and the user sees, by kind, what was not used.
    """

    def __init__(self, kind: str):
        super().__init__(f"rows of type {kind!r} are not used by this domain")
        self.kind = kind
