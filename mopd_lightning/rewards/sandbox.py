"""Run an untrusted Python program with hard limits: the code verifier's only way to execute model output.

Every run gets, as far as the machine allows (see :func:`isolation`):

- its own session and process group, killed as a whole (``SIGKILL``) at the wall-clock deadline, plus a
  ``timeout`` wrapper that still enforces the deadline if the verifier itself dies;
- new PID, network and mount namespaces (``unshare``): the program sees no other process, has no network (only a
  down loopback), and every process it starts dies with it, detached or not; ``/tmp``, ``/var/tmp``, ``/dev/shm``
  and the working folder are private, size-capped tmpfs mounts that vanish with the run;
- a dedicated unprivileged user id (when started as root), one per concurrent run so that ``RLIMIT_NPROC``, which
  the kernel counts per user, bounds this run alone;
- resource limits on CPU time, address space, file size, open files and processes, and no core files;
- a scrubbed environment (``PATH``, ``LANG``, ``HOME`` = the working folder), ``python -I -S`` (no user site,
  no ``PYTHON*`` variables, no ``.pth`` hooks), ``no_new_privs``, and a cap on the output it may write (the run
  is killed when it writes more).

Without root the same namespaces come from an unprivileged user namespace (the program is "root" there, with
every capability dropped). Without namespaces the run degrades, with a one-time warning, to process-group kills,
rlimits and a Python-level socket block; as root it still runs as a pooled uid, and everything that uid left
behind (processes, files in ``/tmp``) is removed after the run.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

log = logging.getLogger(__name__)

_BOOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_boot.py")
_NAMESPACES = ["--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
SANDBOX_UID_BASE = int(os.environ.get("MOPD_SANDBOX_UID_BASE", "64000"))
"""First user id of the sandbox pool (ids ``BASE .. BASE+SANDBOX_UID_COUNT-1``, none with a passwd entry)."""
SANDBOX_UID_COUNT = 128
_WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_SAFE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TMPDIR": "/tmp"}


@dataclass(frozen=True)
class Limits:
    """Per-run resource limits. ``timeout_s`` is wall-clock; CPU time defaults to it (rounded up) plus one.

    ``memory_mb`` is per process (``RLIMIT_AS``): a run's total stays below ``max_processes * memory_mb``.
    (A memory cgroup would bound the total; it is not used, to keep out of the host's cgroup tree.)
    ``max_processes`` counts threads too.
    """

    timeout_s: float = 5.0
    memory_mb: int = 1024
    cpu_s: Optional[int] = None
    file_size_mb: int = 16
    disk_mb: int = 64
    max_processes: int = 32
    max_open_files: int = 256
    max_output_bytes: int = 1 << 20


@dataclass(frozen=True)
class RunResult:
    """What a sandboxed run did. ``ok`` means it exited with status 0 on its own, in time, within the output cap."""

    returncode: Optional[int]
    stdout: str
    stderr: str
    timed_out: bool = False
    output_exceeded: bool = False
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_exceeded


@dataclass(frozen=True)
class Isolation:
    """The isolation mechanisms this machine grants; probed once per process by :func:`isolation`."""

    namespaces: bool  # PID + network + mount namespaces
    user_namespace: bool  # namespaces come from an unprivileged user namespace ("root" only inside it)
    dedicated_uid: bool  # runs as a pooled unprivileged uid (we are root)
    timeout_wrapper: bool  # coreutils `timeout` also enforces the deadline

    def describe(self) -> str:
        parts = [
            "pid+net+mount namespaces" + (" (user namespace)" if self.user_namespace else "")
            if self.namespaces
            else "NO namespaces (process-group kill, Python socket block)",
            "dedicated uid" if self.dedicated_uid else "same uid as the verifier",
            "rlimits",
        ]
        return ", ".join(parts)


# --------------------------------------------------------------------------------------------- probing


@functools.lru_cache(maxsize=None)
def _tool(name: str) -> Optional[str]:
    return shutil.which(name)


def _unshare_prefix(root: bool) -> list:
    if _tool("unshare") is None:
        return []
    return [_tool("unshare")] + ([] if root else ["--user", "--map-root-user"]) + _NAMESPACES


_PROBE_LOCK = threading.Lock()


def isolation() -> Isolation:
    """What isolation works here: probed once per process (thread-safe), then cached."""
    with _PROBE_LOCK:
        return _probe()


@functools.lru_cache(maxsize=None)
def _probe() -> Isolation:
    """Run a trivial program in each configuration, best first, and keep the first that works."""
    root = os.geteuid() == 0
    has_timeout = _tool("timeout") is not None
    candidates = []
    if _unshare_prefix(root):
        candidates.append(Isolation(True, not root, root, has_timeout))
        if root:
            candidates.append(Isolation(True, False, False, has_timeout))
    candidates.append(Isolation(False, False, root, has_timeout))
    if root:
        candidates.append(Isolation(False, False, False, has_timeout))
    for candidate in candidates:
        result = _run(candidate, "import fractions, socket; print('ok')", {}, b"", Limits(timeout_s=20))
        if result.ok and result.stdout.strip() == "ok":
            if not (candidate.namespaces and candidate.dedicated_uid):
                _warn_degraded(candidate)
            return candidate
        log.debug("sandbox probe failed for %s: %s", candidate, result.stderr[-500:])
    _warn_degraded(candidates[-1])
    return candidates[-1]


def _warn_degraded(chosen: Isolation) -> None:
    message = f"Code sandbox runs with reduced isolation on this machine: {chosen.describe()}."
    if not chosen.namespaces:
        message += " Network is blocked only at the Python level; the machine's /tmp is shared."
    if not chosen.dedicated_uid:
        message += " The program runs as the verifier's own user (its files and processes are reachable)."
    if not (chosen.namespaces or chosen.dedicated_uid):
        message += " Detached child processes may outlive a run."
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    log.warning(message)


@functools.lru_cache(maxsize=None)
def _hidden_interpreter_paths() -> list:
    """[(ancestor, [paths])]: folders the sandbox user cannot traverse that hold the interpreter or its libraries.

    A Python installed under root's 0700 home (pyenv) is the usual case; the boot script hides such an ancestor
    behind an empty tmpfs and binds back only these paths.
    """
    needed = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix)}
    needed.add(os.path.dirname(os.path.realpath(sys.executable)))
    hidden: dict = {}
    for path in sorted(needed):
        parts = path.split(os.sep)
        for i in range(2, len(parts) + 1):
            ancestor = os.sep.join(parts[:i])
            if not os.stat(ancestor).st_mode & 0o001:  # others may not traverse it
                hidden.setdefault(ancestor, set()).add(path)
                break
    result = []
    for ancestor, paths in sorted(hidden.items()):
        outermost = [p for p in sorted(paths) if not any(p.startswith(q + os.sep) for q in paths)]
        result.append((ancestor, outermost))
    return result


@functools.lru_cache(maxsize=None)
def _site_packages() -> list:
    """The verifier's site-packages folders, so that programs can import what is installed (numpy, ...)."""
    import site

    return [p for p in site.getsitepackages() if os.path.isdir(p)]


# --------------------------------------------------------------------------------------------- uid pool


@contextmanager
def _claimed_uid() -> Iterator[int]:
    """Hold one uid of the pool for the duration of a run (a file lock, so other processes respect it too)."""
    lock_dir = os.path.join(tempfile.gettempdir(), "mopd-sandbox-uids")
    os.makedirs(lock_dir, mode=0o700, exist_ok=True)
    st = os.lstat(lock_dir)
    if st.st_uid != os.geteuid() or not os.path.isdir(lock_dir) or os.path.islink(lock_dir):
        raise RuntimeError(f"refusing to use {lock_dir}: not a directory owned by this user")
    start = random.randrange(SANDBOX_UID_COUNT)
    while True:
        for i in range(SANDBOX_UID_COUNT):
            uid = SANDBOX_UID_BASE + (start + i) % SANDBOX_UID_COUNT
            fd = os.open(os.path.join(lock_dir, str(uid)), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield uid
            finally:
                os.close(fd)  # releases the lock
            return
        time.sleep(0.01)


def _kill_uid(uid: int) -> None:
    """Kill every process of ``uid`` (used only without a PID namespace, where detached children can escape)."""
    for _ in range(20):
        found = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/status") as f:
                    real_uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
                if real_uid == uid:
                    os.kill(int(entry), signal.SIGKILL)
                    found = True
            except (OSError, StopIteration, ValueError):
                continue
        if not found:
            return
        time.sleep(0.005)


def _remove_files_of(uid: int) -> None:
    """Delete what ``uid`` left in the shared world-writable folders (only without a private mount namespace)."""
    for folder in _WORLD_WRITABLE:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass


def _count_processes_of(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == uid:
                count += 1
        except OSError:
            pass
    return count


# --------------------------------------------------------------------------------------------- running


def run_python(
    script: str,
    files: Optional[Mapping[str, str]] = None,
    stdin: str | bytes = b"",
    limits: Limits = Limits(),
) -> RunResult:
    """Run ``script`` (Python source, as ``main.py``) in the sandbox; ``files`` are extra files in its folder.

    Never raises for anything the program does; a failure to start the sandbox itself comes back as a
    ``RunResult`` with ``returncode=None`` and the reason in ``stderr``.
    """
    try:
        return _run(isolation(), script, files or {}, stdin, limits)
    except Exception as e:  # noqa: BLE001 - the verifier must never raise on model output
        return RunResult(None, "", f"sandbox error: {type(e).__name__}: {e}")


def _run(iso: Isolation, script: str, files: Mapping[str, str], stdin, limits: Limits) -> RunResult:
    if iso.dedicated_uid:
        with _claimed_uid() as uid:
            if not iso.namespaces:
                _kill_uid(uid)  # leftovers of a verifier that died mid-run
            return _run_as(iso, uid, script, files, stdin, limits)
    return _run_as(iso, None, script, files, stdin, limits)


def _rlimits(iso: Isolation, uid: Optional[int], limits: Limits) -> dict:
    cpu = limits.cpu_s if limits.cpu_s is not None else int(limits.timeout_s) + 1
    nproc = limits.max_processes
    if uid is None:  # the count is per user, and this user already runs other processes
        nproc += _count_processes_of(os.getuid())
    mb = 1 << 20
    return {
        "CPU": [cpu, cpu + 1],
        "AS": limits.memory_mb * mb,
        "FSIZE": limits.file_size_mb * mb,
        "NPROC": nproc,
        "NOFILE": limits.max_open_files,
        "CORE": 0,
    }


def _run_as(iso: Isolation, uid, script: str, files: Mapping[str, str], stdin, limits: Limits) -> RunResult:
    root = os.geteuid() == 0
    host_dir = tempfile.mkdtemp(prefix="mopd-sandbox-")
    workdir = os.path.join(host_dir, "work")
    try:
        os.chmod(host_dir, 0o711)
        os.mkdir(workdir, 0o700)
        for name, text in {"main.py": script, **files}.items():
            with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
                f.write(text)
        stdin_path = os.path.join(host_dir, "stdin")
        with open(stdin_path, "wb") as f:
            f.write(stdin.encode("utf-8", "replace") if isinstance(stdin, str) else stdin)
        config = {
            "workdir": workdir,
            "script": "main.py",
            "uid": uid,
            "gid": uid,
            "private_mounts": iso.namespaces,
            "disk_mb": limits.disk_mb,
            "reveal": _hidden_interpreter_paths() if iso.namespaces and uid is not None else [],
            "drop_capabilities": iso.namespaces and uid is None,  # (namespace-)root: no capabilities left
            "block_sockets": not iso.namespaces,
            "rlimits": _rlimits(iso, uid, limits),
            "site_packages": _site_packages(),
        }
        command = [sys.executable, "-I", "-S", _BOOT, json.dumps(config)]
        if iso.namespaces:
            command = _unshare_prefix(root) + ["--"] + command
        if iso.timeout_wrapper:
            command = [_tool("timeout"), "--signal=KILL", f"{limits.timeout_s + 1.0:.2f}"] + command
        env = dict(_SAFE_ENV, HOME=workdir)
        with open(stdin_path, "rb") as stdin_file:
            return _supervise(command, stdin_file, env, host_dir, uid, iso, limits)
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


def _supervise(command, stdin_file, env, cwd, uid, iso: Isolation, limits: Limits) -> RunResult:
    """Start the process tree, read its output up to the cap, and kill the whole tree when done or over limits."""
    start = time.monotonic()
    deadline = start + limits.timeout_s
    proc = subprocess.Popen(
        command,
        stdin=stdin_file,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=env,
        start_new_session=True,
        close_fds=True,
    )
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    timed_out = exceeded = False
    exited_at = None
    with selectors.DefaultSelector() as selector:
        for pipe in buffers:
            os.set_blocking(pipe.fileno(), False)
            selector.register(pipe, selectors.EVENT_READ)
        while selector.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.2:  # a leftover holds the pipe open
                break
            for key, _ in selector.select(timeout=min(0.05, deadline - now)):
                chunk = key.fileobj.read1(65536) if hasattr(key.fileobj, "read1") else key.fileobj.read(65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffers[key.fileobj] += chunk
                if len(buffers[key.fileobj]) > limits.max_output_bytes:
                    exceeded = True
            if exceeded:
                break
    if not (timed_out or exceeded):
        try:
            proc.wait(timeout=max(0.0, min(deadline - time.monotonic(), 0.5)))
        except subprocess.TimeoutExpired:
            pass
    _kill_tree(proc, uid, iso)
    for pipe in buffers:
        pipe.close()
    returncode = proc.returncode
    if timed_out or exceeded:
        returncode = returncode if returncode is not None and returncode != -signal.SIGKILL else None
    cap = limits.max_output_bytes
    return RunResult(
        returncode=returncode,
        stdout=bytes(buffers[proc.stdout][:cap]).decode("utf-8", "replace"),
        stderr=bytes(buffers[proc.stderr][:cap]).decode("utf-8", "replace"),
        timed_out=timed_out,
        output_exceeded=exceeded,
        wall_s=time.monotonic() - start,
    )


def _kill_tree(proc: subprocess.Popen, uid, iso: Isolation) -> None:
    """SIGKILL the run's process group; the PID namespace takes every other descendant down with its init."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if uid is not None and not iso.namespaces:
        _kill_uid(uid)
        _remove_files_of(uid)
