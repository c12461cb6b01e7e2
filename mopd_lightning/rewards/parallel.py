"""Verify a batch of rollouts in parallel, bounded by the machine's cores, results in input order.

A verifier says where its work belongs through an ``executor`` attribute:

- ``"thread"`` (code): the work happens in sandbox subprocesses, so threads are enough;
- ``"process"`` (math): CPU-bound Python that needs ``signal.alarm`` for its time limit, which only a main thread
  may use, so it runs in long-lived worker processes (:mod:`..execution.workers`), each call in a main thread. The
  callable must be picklable by reference (a module-level function or an instance of a module-level class);
- ``"inline"`` (sci, tool): microseconds of work, not worth a pool.

Callables without the attribute run in threads. Verifiers never raise; a callable that does is scored 0 with the
error as feedback, so one bad rollout cannot stop a training step.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, Sequence, Union

from ..execution.workers import PROCESS_TASK_TIMEOUT_S, WorkerError, WorkerTimeout, call_in_process, default_workers
from .base import Score, Verifier
from .registry import get_verifier

log = logging.getLogger(__name__)


def _error_score(e: BaseException) -> Score:
    text = str(e) if isinstance(e, WorkerError) else f"{type(e).__name__}: {e}"
    log.warning("verifier raised %s", text)
    return Score(0.0, f"Verifier error: {text[:200]}")


def _safe_call(fn: Callable, response: Any, ground_truth: Any) -> Score:
    try:
        return fn(response, ground_truth)
    except Exception as e:  # noqa: BLE001
        return _error_score(e)


def _process_call(fn: Callable, response: Any, ground_truth: Any) -> Score:
    try:
        timeout_s = getattr(fn, "hard_timeout_s", PROCESS_TASK_TIMEOUT_S)
        return call_in_process(fn, response, ground_truth, timeout_s=timeout_s)
    except WorkerTimeout:
        return Score(0.0, f"Verification timed out after {timeout_s:g}s.")
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
