"""Run an untrusted Python program with hard limits: the code verifier's only way to execute model output.

Every run gets, as far as the machine allows (levels in :mod:`.levels`):

- bubblewrap's PID, network, IPC, UTS and mount namespaces: the program sees no other process, has no network,
  its SysV IPC objects vanish with it, and the machine is read-only except private, size-capped ``/tmp``,
  ``/var/tmp``, ``/dev/shm`` (its working folder is ``/tmp/work``). The interpreter, its site-packages and the
  boot script are bound back read-only wherever they live (a virtual environment under ``/tmp`` included);
- one unprivileged uid of the pool per program (as root), one memory cgroup per run;
- rlimits (CPU time, address space, file size, open files, processes; no core files), a scrubbed environment,
  ``python -I -S``, ``no_new_privs``, a cap on the output it may write;
- at the deadline, or when the program is done, the namespace's first process is killed: the kernel then kills
  every process of the namespace, whatever it did (new session, double fork). The supervisor checks that the
  run's uids have no process left before they go back to the pool.

A *judged* run (``judge=``) runs the program and a trusted judge as two processes that talk over pipes; only the
judge's exit status and output reach the verifier (see ``_boot.py``): a program cannot forge a pass.
"""

from __future__ import annotations

import functools
import json
import marshal
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from . import uids
from .cgroups import RunCgroup
from .levels import PROBE_TIMEOUT_S, Isolation, machine_isolation, require

_BOOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_boot.py")
_SAFE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TMPDIR": "/tmp"}
_PRIVATE = uids.WORLD_WRITABLE  # the machine's world-writable folders: fresh tmpfs mounts inside the sandbox
_WORKDIR = "/tmp/work"
_INPUTS = "/tmp/.inputs"  # the program's files, read-only; the boot script copies them into the working folder


@dataclass(frozen=True)
class Limits:
    """Per-run resource limits. ``timeout_s`` is wall-clock; CPU time defaults to it (rounded up) plus one.

    ``memory_mb`` bounds each process (``RLIMIT_AS``) and, where a memory cgroup is available, the whole run.
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


def _probe(candidate: Isolation) -> Optional[str]:
    """None when a trivial program (and a judged one) runs at this level; else what went wrong."""
    limits = Limits(timeout_s=PROBE_TIMEOUT_S)
    for attempt in range(2):  # a timed-out probe says the machine is slow, not that the level is impossible
        plain = _run(candidate, "import fractions, socket; print('ok')", {}, b"", limits, None)
        judged = _run(candidate, "import os; os.write(4, os.read(3, 2))", {}, b"", limits,
                      "import os; os.write(4, b'ok'); print(os.read(3, 2).decode())") if plain.ok else plain
        if plain.ok and judged.ok and plain.stdout.strip() == judged.stdout.strip() == "ok":
            return None
        if not (plain.timed_out or judged.timed_out):
            break
    failed = judged if plain.ok else plain
    return f"exit {failed.returncode}, timed out {failed.timed_out}: {failed.stderr.strip()[-800:]}"


def isolation(required: str = "auto") -> Isolation:
    """The isolation runs get on this machine (probed once per process); raises
    :class:`~.levels.SandboxUnavailable` if it is less than ``required`` (``auto`` takes the best)."""
    return require(required, machine_isolation(_probe))


def run_python(
    script: str,
    files: Optional[Mapping[str, str]] = None,
    stdin: str | bytes = b"",
    limits: Limits = Limits(),
    judge: Optional[str] = None,
    required: str = "auto",
    preload: Sequence[str] = (),
) -> RunResult:
    """Run ``script`` (Python source, as ``main.py``) in the sandbox; ``files`` are extra files in its folder.

    With ``judge`` (Python source), the program gets fds 3/4 to talk to the judge instead of stdin/stdout, and the
    result is the judge's (``stdin`` is unused). ``preload`` names modules imported before the program starts (in a
    judged run once, before the fork, for both halves). Raises :class:`~.levels.SandboxUnavailable` when the machine
    allows less than ``required``; never raises for anything the program does. A failure to start the sandbox
    comes back as a ``RunResult`` with ``returncode=None`` and the reason in ``stderr``.
    """
    iso = isolation(required)
    try:
        return _run(iso, script, files or {}, stdin, limits, judge, preload)
    except Exception as e:  # noqa: BLE001 - the verifier must never raise on model output
        return RunResult(None, "", f"sandbox error: {type(e).__name__}: {e}")


def _run(iso: Isolation, script: str, files: Mapping[str, str], stdin, limits: Limits, judge,
         preload: Sequence[str] = ()) -> RunResult:
    if judge is not None:
        stdin = judge
    stdin = stdin.encode("utf-8", "replace") if isinstance(stdin, str) else stdin
    n_uids = (2 if judge is not None else 1) if iso.dedicated_uid else 0
    with uids.claimed_uids(n_uids) as run_uids:  # nothing of the run may live on under them afterwards
        try:
            return _run_as(iso, run_uids, script, files, stdin, limits, judge is not None, preload)
        finally:
            if not iso.namespaces:
                uids.kill_uids(run_uids)
                for uid in run_uids:
                    uids.remove_files_of(uid)


def _rlimits(run_uids: list, limits: Limits) -> dict:
    cpu = limits.cpu_s if limits.cpu_s is not None else int(limits.timeout_s) + 1
    nproc = limits.max_processes
    if not run_uids:  # counted per user, and this user already runs other processes
        nproc += len(uids.pids_of({os.getuid()}))
    mb = 1 << 20
    return {"CPU": [cpu, cpu + 1], "AS": limits.memory_mb * mb, "FSIZE": limits.file_size_mb * mb, "NPROC": nproc,
            "NOFILE": limits.max_open_files, "CORE": 0}


def _run_as(iso: Isolation, run_uids: list, script: str, files, stdin: bytes, limits: Limits, judged: bool,
            preload: Sequence[str]):
    host_dir = tempfile.mkdtemp(prefix="mopd-sandbox-")
    cgroup = info_r = info_w = None  # the info pipe belongs to _supervise once made (it closes both ends)
    try:
        os.chmod(host_dir, 0o711)
        workdir = os.path.join(host_dir, "work")
        os.mkdir(workdir, 0o700)
        for name, text in {"main.py": script, **files}.items():
            with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
                f.write(text)
        stdin_path = os.path.join(host_dir, "stdin")
        with open(stdin_path, "wb") as f:
            f.write(stdin)
        config = {
            "workdir": _WORKDIR if iso.namespaces else workdir,
            "inputs": _INPUTS if iso.namespaces else None,
            "script": "main.py",
            "uids": run_uids,
            "judge": judged,
            "preload": list(preload),
            "block_sockets": not iso.namespaces,
            "no_new_privs": not iso.namespaces,  # bubblewrap sets it for everything it starts
            "rlimits": _rlimits(run_uids, limits),
            "site_packages": _site_packages(),
        }
        command = [sys.executable, "-I", "-S", _BOOT, marshal.dumps(config).hex()]
        if iso.memory_cgroup:
            cgroup = RunCgroup(iso.memory_cgroup, limits.memory_mb << 20)
        if iso.namespaces:
            info_r, info_w = os.pipe()
            command = _bwrap(iso, workdir, info_w, limits) + ["--"] + command
        if cgroup is not None:
            command = cgroup.enter + command
        env = dict(_SAFE_ENV, HOME=config["workdir"])
        with open(stdin_path, "rb") as stdin_file:
            return _supervise(command, stdin_file, env, host_dir, limits, info_r, info_w)
    finally:
        if cgroup is not None:
            cgroup.remove()
        shutil.rmtree(host_dir, ignore_errors=True)


def _bwrap(iso: Isolation, workdir: str, info_fd: int, limits: Limits) -> list:
    size = str(limits.disk_mb << 20)
    args = [iso.bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--info-fd", str(info_fd), "--hostname", "sandbox"]
    if iso.user_namespace:
        args += ["--unshare-user", "--disable-userns"]
    args += ["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
    for folder in _PRIVATE:
        if os.path.isdir(folder) and not os.path.islink(folder):
            args += ["--size", size, "--tmpfs", folder]
    hidden, binds = _hidden_and_bound(iso.dedicated_uid)
    for folder in hidden:
        args += ["--tmpfs", folder]
    for path in binds:
        for parent in _parents_below(path, hidden + list(_PRIVATE)):  # bwrap would make them 0700
            args += ["--perms", "0755", "--dir", parent]
        args += ["--ro-bind", path, path]
    return args + ["--ro-bind", workdir, _INPUTS, "--dir", _WORKDIR, "--chdir", _WORKDIR]


@functools.lru_cache(maxsize=None)
def _hidden_and_bound(dedicated_uid: bool) -> tuple:
    """(folders to hide behind an empty tmpfs, paths to bind back read-only) so that the interpreter, its
    libraries and the boot script are reachable, and nothing else of the folders that hold them.

    Hidden: the verifier's home, and (for a pooled uid) any folder others may not traverse (a Python under
    root's 0700 home). Bound back: every needed path under a hidden or private folder (a venv under /tmp).
    """
    needed = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix)}
    needed |= {os.path.dirname(os.path.realpath(sys.executable)), os.path.dirname(os.path.abspath(sys.executable)),
               os.path.dirname(_BOOT)} | {os.path.realpath(p) for p in _site_packages()}
    home = os.path.realpath(os.path.expanduser("~"))
    hidden = {home} if home not in ("/", "") and os.path.isdir(home) else set()
    binds = set()
    for path in needed:
        parts = path.split(os.sep)
        for i in range(2, len(parts) + 1):
            ancestor = os.sep.join(parts[:i])
            if dedicated_uid and not os.stat(ancestor).st_mode & 0o001:  # the pool uid may not traverse it
                hidden.add(ancestor)
        if any(path == f or path.startswith(f + os.sep) for f in hidden | set(_PRIVATE)):
            binds.add(path)
    hidden = {h for h in hidden if not any(h.startswith(p + os.sep) for p in _PRIVATE)}
    outermost_hidden = sorted(h for h in hidden if not any(h.startswith(o + os.sep) for o in hidden))
    outermost_binds = sorted(p for p in binds if not any(p.startswith(q + os.sep) for q in binds))
    return outermost_hidden, outermost_binds


def _parents_below(path: str, roots: list) -> list:
    """The folders between the innermost of ``roots`` that holds ``path`` and ``path`` itself, outermost first."""
    root = max((r for r in roots if path.startswith(r + os.sep)), key=len)
    parts = path[len(root):].strip(os.sep).split(os.sep)[:-1]
    return [os.path.join(root, *parts[:i]) for i in range(1, len(parts) + 1)]


@functools.lru_cache(maxsize=None)
def _site_packages() -> list:
    """The verifier's site-packages folders, so that programs can import what is installed (numpy, ...)."""
    import site

    return [p for p in site.getsitepackages() if os.path.isdir(p)]


def _supervise(command, stdin_file, env, cwd, limits: Limits, info_r, info_w) -> RunResult:
    """Start the process tree, read its output up to the cap, and kill the whole tree when done or over limits."""
    start = time.monotonic()
    deadline = start + limits.timeout_s
    try:
        proc = subprocess.Popen(command, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                                env=env, start_new_session=True, close_fds=True,
                                pass_fds=() if info_w is None else (info_w,))
    except BaseException:
        if info_r is not None:
            os.close(info_r)
        raise
    finally:
        if info_w is not None:
            os.close(info_w)
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    info = _Info(info_r)
    timed_out = exceeded = False
    exited_at = None
    with selectors.DefaultSelector() as selector:
        for pipe in buffers:
            os.set_blocking(pipe.fileno(), False)
            selector.register(pipe, selectors.EVENT_READ)
        if info_r is not None:
            selector.register(info_r, selectors.EVENT_READ)
        while set(selector.get_map()) - {info_r}:
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.2:  # a leftover holds the pipe open
                break
            for key, _ in selector.select(timeout=min(0.05, deadline - now)):
                if key.fileobj == info_r:
                    if not info.read():
                        selector.unregister(info_r)
                    continue
                chunk = key.fileobj.read1(65536)
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
    _kill_tree(proc, info)
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


class _Info:
    """bubblewrap's ``--info-fd`` report: the host pid of the namespace's first process."""

    def __init__(self, fd: Optional[int]):
        self.fd, self.data, self.child_pid = fd, b"", None

    def read(self) -> bool:
        """Read what is there; False at end of file."""
        chunk = os.read(self.fd, 4096)
        self.data += chunk
        try:
            self.child_pid = int(json.loads(self.data)["child-pid"])
        except (ValueError, KeyError, TypeError):
            pass
        return bool(chunk)

    def close(self) -> None:
        if self.fd is not None:
            if self.child_pid is None:
                os.set_blocking(self.fd, False)
                try:
                    self.read()
                except OSError:
                    pass
            os.close(self.fd)
            self.fd = None


def _kill_tree(proc: subprocess.Popen, info: _Info) -> None:
    """SIGKILL the namespace's first process (the kernel then kills all of the namespace) and the process group."""
    info.close()
    if info.child_pid is not None:
        try:
            os.kill(info.child_pid, signal.SIGKILL)
        except OSError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
