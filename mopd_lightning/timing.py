"""Wall-clock time per phase of a step, for the logs."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Dict


class PhaseTimer:
    def __init__(self):
        self.seconds: Dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    @property
    def total(self) -> float:
        return sum(self.seconds.values())
