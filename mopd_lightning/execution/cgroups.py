"""A memory cgroup per sandboxed run, so that memory is bounded per run, not only per process.

``RLIMIT_AS`` bounds each process; a run may start many (and tmpfs pages count nowhere else). Where this process
may create child cgroups (root on a cgroup v1 ``memory`` hierarchy, or cgroup v2 with the ``memory`` controller
delegated to our cgroup's children) every run gets its own, with ``memory`` (and swap) capped at the run's limit.
Elsewhere :func:`memory_parent` is None and the sandbox reports that memory is bounded per process only.
"""

from __future__ import annotations

import functools
import os
import secrets
import time
from typing import Optional


def _own_cgroup() -> dict:
    """{controller (or "" for v2): path} of this process, from /proc/self/cgroup."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    return paths


def _mounts() -> list:
    """[(mount point, fs type, super options)] from /proc/self/mountinfo."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            fstype, _, options = right.split()[:3]
            mounts.append((left.split()[4], fstype, options.split(",")))
    return mounts


@functools.lru_cache(maxsize=None)
def memory_parent() -> Optional[str]:
    """The folder where per-run memory cgroups can be made, or None where this machine does not allow it."""
    try:
        own, mounts = _own_cgroup(), _mounts()
    except (OSError, ValueError):
        return None
    for point, fstype, options in mounts:
        if fstype == "cgroup" and "memory" in options and "memory" in own:  # v1
            folder = os.path.join(point, own["memory"].lstrip("/"))
            if _can_make_child(folder, "memory.limit_in_bytes"):
                return folder
    for point, fstype, _ in mounts:
        if fstype == "cgroup2" and "" in own:  # v2: memory must be enabled for our children
            folder = os.path.join(point, own[""].lstrip("/"))
            try:
                with open(os.path.join(folder, "cgroup.subtree_control")) as f:
                    delegated = "memory" in f.read().split()
            except OSError:
                continue
            if delegated and _can_make_child(folder, "memory.max"):
                return folder
    return None


def _can_make_child(folder: str, limit_file: str) -> bool:
    probe = os.path.join(folder, "mopd-sandbox-probe-" + secrets.token_hex(4))
    try:
        os.mkdir(probe)
    except OSError:
        return False
    try:
        return os.path.exists(os.path.join(probe, limit_file))
    finally:
        os.rmdir(probe)


class RunCgroup:
    """One run's memory cgroup: ``enter`` is a command prefix that moves the run into it before it starts."""

    def __init__(self, parent: str, memory_bytes: int):
        self.path = os.path.join(parent, "mopd-sandbox-" + secrets.token_hex(8))
        os.mkdir(self.path)
        try:
            if os.path.exists(os.path.join(self.path, "memory.max")):  # v2
                self._write("memory.max", memory_bytes)
                self._write("memory.swap.max", 0, optional=True)
            else:  # v1: the memory+swap limit may not be set below the memory limit
                self._write("memory.limit_in_bytes", memory_bytes)
                self._write("memory.memsw.limit_in_bytes", memory_bytes, optional=True)
        except BaseException:
            self.remove()
            raise

    def _write(self, name: str, value: int, optional: bool = False) -> None:
        try:
            with open(os.path.join(self.path, name), "w") as f:
                f.write(str(value))
        except OSError:
            if not optional:
                raise

    @property
    def enter(self) -> list:
        """``sh -c`` that writes its own pid into the cgroup and then becomes the real command."""
        script = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
        return ["/bin/sh", "-c", script, self.path]

    def remove(self) -> None:
        """Delete the cgroup once its processes are gone (they die with the run's PID namespace)."""
        deadline = time.monotonic() + 2.0
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:  # busy: the namespace's processes are still being torn down (well under a ms)
                if time.monotonic() > deadline:
                    return
                time.sleep(0.0002)
