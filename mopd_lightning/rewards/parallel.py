"""Verify a batch of rollouts in parallel, bounded by the machine's cores, results in input order.

A verifier says where its work belongs through an ``executor`` attribute:

- ``"thread"`` (code): the work happens in sandbox subprocesses, so threads are enough;
- ``"process"`` (math): CPU-bound Python that needs ``signal.alarm`` for its time limit, which only a main thread
  may use, so it runs in long-lived worker processes (``_worker.py``), each call in a worker's main thread. The
  callable must be picklable by reference (a module-level function or an instance of a module-level class);
- ``"inline"`` (sci, tool): microseconds of work, not worth a pool.

Callables without the attribute run in threads. Verifiers never raise; a callable that does is scored 0 with the
error as feedback, so one bad rollout cannot stop a training step.

The workers are plain subprocesses rather than a ``multiprocessing`` pool: those re-import the caller's
``__main__`` in every worker (a training script without a main guard would start training again), and ``fork``
is unsafe in a multi-threaded trainer. A worker that overruns its hard deadline is killed and replaced.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import pickle
import queue
import select
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, Sequence, Union

from .base import Score, Verifier, get_verifier

log = logging.getLogger(__name__)

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
    """The environment for workers: ours, plus this checkout on PYTHONPATH only if a fresh interpreter lacks it.

    (Adding the checkout unconditionally would also expose its ``kernels/`` folder as a top-level ``kernels``
    package, a name transformers probes for.)
    """
    env = dict(os.environ)
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('mopd_lightning') is None)"
    if subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode != 0:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    return env


class _WorkerLost(Exception):
    """The worker died or overran its deadline; it has been killed."""


class _Worker:
    """One worker process, talking pickles over two pipes."""

    def __init__(self):
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mopd_lightning.rewards._worker", str(request_r), str(reply_w)],
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
            return pickle.loads(self._read(size, deadline))
        except (OSError, EOFError, pickle.UnpicklingError, struct.error) as e:
            self.kill()
            raise _WorkerLost(str(e)) from e

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

    def call(self, fn: Callable, args: tuple, timeout_s: float) -> Score:
        payload = pickle.dumps((fn, args))  # fails here, before taking a worker, if fn cannot be pickled
        for _attempt in range(2):  # a worker that simply died (killed from outside) gets one replacement
            worker = self._checkout()
            start = time.monotonic()
            try:
                result = worker.call(payload, timeout_s)
            except _WorkerLost:
                self._lost()
                if time.monotonic() - start >= timeout_s:
                    return Score(0.0, f"Verification timed out after {timeout_s:g}s.")
                continue
            self.idle.put(worker)
            return result
        return Score(0.0, "Verification failed: the worker process died.")

    def close(self) -> None:
        while True:
            try:
                self.idle.get_nowait().kill()
            except queue.Empty:
                return


_POOL = _WorkerPool()
atexit.register(_POOL.close)


def call_in_process(fn: Callable, *args: Any, timeout_s: float = PROCESS_TASK_TIMEOUT_S) -> Score:
    """Run one verifier call in a worker process's main thread, with a hard deadline."""
    return _POOL.call(fn, args, timeout_s)


def _error_score(e: BaseException) -> Score:
    log.warning("verifier raised %s: %s", type(e).__name__, e)
    return Score(0.0, f"Verifier error: {type(e).__name__}: {str(e)[:200]}")


def _safe_call(fn: Callable, response: Any, ground_truth: Any) -> Score:
    try:
        return fn(response, ground_truth)
    except Exception as e:  # noqa: BLE001
        return _error_score(e)


def _process_call(fn: Callable, response: Any, ground_truth: Any) -> Score:
    try:
        timeout_s = getattr(fn, "hard_timeout_s", PROCESS_TASK_TIMEOUT_S)
        return call_in_process(fn, response, ground_truth, timeout_s=timeout_s)
    except Exception as e:  # noqa: BLE001 - e.g. a callable that cannot be pickled
        return _error_score(e)


def verify_batch(
    verifier: Union[str, Verifier],
    responses: Sequence[str],
    ground_truths: Sequence[Any],
    max_workers: int | None = None,
) -> List[Score]:
    """Score ``responses[i]`` against ``ground_truths[i]`` for all ``i``, in parallel; results in input order.

    ``verifier`` is a registered name (``"math"``, ``"code"``, ...) or a callable. ``max_workers`` defaults to
    the number of usable cores.
    """
    fn = get_verifier(verifier) if isinstance(verifier, str) else verifier
    responses, ground_truths = list(responses), list(ground_truths)
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    if not responses:
        return []
    workers = min(max(1, max_workers or default_workers()), len(responses))
    executor = getattr(fn, "executor", "thread")
    call = _process_call if executor == "process" else _safe_call
    if executor == "inline" or (workers == 1 and executor != "process"):
        return [call(fn, r, g) for r, g in zip(responses, ground_truths)]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(call, [fn] * len(responses), responses, ground_truths))
