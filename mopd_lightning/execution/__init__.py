"""Running untrusted code and verifier work: the sandbox and the verifier worker processes.

``run_python`` runs one program in the sandbox (levels and their guarantees in :mod:`.levels`);
``call_in_process`` runs one verifier call in a long-lived worker process.
"""

from .levels import LEVELS, Isolation, SandboxUnavailable
from .sandbox import Limits, RunResult, isolation, run_python
from .workers import call_in_process, default_workers

__all__ = ["LEVELS", "Isolation", "Limits", "RunResult", "SandboxUnavailable", "call_in_process", "default_workers",
           "isolation", "run_python"]
