"""Long-lived worker processes for verifier calls that need a main thread (``signal.alarm``) and a hard deadline.

The workers are plain subprocesses (``python -m mopd_lightning.execution._worker``) rather than a
``multiprocessing`` pool: those re-import the caller's ``__main__`` in every worker (a training script without a
main guard would start training again), and ``fork`` is unsafe in a multi-threaded trainer. A worker that overruns
its hard deadline is killed and replaced.
"""

from __future__ import annotations

import atexit
import functools
import os
import pickle
import queue
import select
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Callable

PROCESS_TASK_TIMEOUT_S = 60.0
"""Hard limit for one call in a worker process (a verifier's own limit should trigger long before it)."""
_HEADER = struct.Struct("<Q")
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@functools.lru_cache(maxsize=None)
def _worker_env() -> dict:
    """The environment for workers: ours, plus this checkout on PYTHONPATH only if a fresh interpreter lacks it."""
    env = dict(os.environ)
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('mopd_lightning') is None)"
    if subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode != 0:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    return env


class WorkerError(RuntimeError):
    """The call raised in the worker; the message is ``"ExceptionType: message"``."""


class WorkerTimeout(RuntimeError):
    """The call overran its deadline; the worker has been killed."""


class _WorkerLost(Exception):
    """The worker died or overran its deadline; it has been killed."""


class _Worker:
    """One worker process, talking pickles over two pipes."""

    def __init__(self):
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mopd_lightning.execution._worker", str(request_r), str(reply_w)],
            pass_fds=(request_r, reply_w),
            stdin=subprocess.DEVNULL,
            env=_worker_env(),
        )
        os.close(request_r)
        os.close(reply_w)
        self.requests = os.fdopen(request_w, "wb")
        self.replies = reply_r

    def call(self, payload: bytes, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        try:
            self.requests.write(_HEADER.pack(len(payload)) + payload)
            self.requests.flush()
            size = _HEADER.unpack(self._read(_HEADER.size, deadline))[0]
            status, value = pickle.loads(self._read(size, deadline))
        except (OSError, EOFError, pickle.UnpicklingError, struct.error, ValueError) as e:
            self.kill()
            raise _WorkerLost(str(e)) from e
        if status == "error":
            raise WorkerError(value)
        return value

    def _read(self, n: int, deadline: float) -> bytes:
        data = bytearray()
        while len(data) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.replies], [], [], remaining)[0]:
                raise OSError("no reply within the deadline")
            chunk = os.read(self.replies, n - len(data))
            if not chunk:
                raise EOFError("worker exited")
            data += chunk
        return bytes(data)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for close in (self.requests.close, lambda: os.close(self.replies)):
            try:
                close()
            except OSError:
                pass


class _WorkerPool:
    """Up to ``default_workers()`` long-lived workers, started on demand and shared by all callers."""

    def __init__(self):
        self.idle: "queue.LifoQueue[_Worker]" = queue.LifoQueue()
        self.lock = threading.Lock()
        self.started = 0
        self.capacity = default_workers()

    def _checkout(self) -> _Worker:
        while True:
            with self.lock:
                try:
                    return self.idle.get_nowait()
                except queue.Empty:
                    if self.started < self.capacity:
                        self.started += 1
                        break
            try:
                return self.idle.get(timeout=0.05)
            except queue.Empty:
                continue
        try:
            return _Worker()
        except BaseException:
            self._lost()
            raise

    def _lost(self) -> None:
        with self.lock:
            self.started -= 1

    def call(self, fn: Callable, args: tuple, timeout_s: float) -> Any:
        payload = pickle.dumps((fn, args))  # fails here, before taking a worker, if fn cannot be pickled
        for _attempt in range(2):  # a worker that simply died (killed from outside) gets one replacement
            worker = self._checkout()
            start = time.monotonic()
            try:
                result = worker.call(payload, timeout_s)
            except _WorkerLost:
                self._lost()
                if time.monotonic() - start >= timeout_s:
                    raise WorkerTimeout(f"no answer within {timeout_s:g}s") from None
                continue
            except WorkerError:
                self.idle.put(worker)
                raise
            self.idle.put(worker)
            return result
        raise WorkerError("WorkerLost: the worker process died twice")

    def close(self) -> None:
        while True:
            try:
                self.idle.get_nowait().kill()
            except queue.Empty:
                return


_POOL = _WorkerPool()
atexit.register(_POOL.close)


def call_in_process(fn: Callable, *args: Any, timeout_s: float = PROCESS_TASK_TIMEOUT_S) -> Any:
    """``fn(*args)`` in a worker process's main thread, with a hard deadline.

    Raises :class:`WorkerTimeout` past the deadline and :class:`WorkerError` when ``fn`` raised.
    """
    return _POOL.call(fn, args, timeout_s)
