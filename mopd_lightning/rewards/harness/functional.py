"""Runs inside the sandbox for functional (LeetCode-style) tests; never imported by the library.

Loads ``solution.py``, finds the function (``Solution().<fn_name>`` or a top-level ``<fn_name>``), calls it once
per argument list in ``tests.json`` under a per-test alarm, and writes one JSON line per test on the original
stdout. The program's own prints go to /dev/null. Expected outputs never enter the sandbox: the verifier
compares the returned values itself, so a program can only earn a pass by returning the right values.
"""

import json
import os
import signal
import sys


class _TestTimeout(BaseException):
    pass


def _on_alarm(signum, frame):
    raise _TestTimeout()


def _jsonable(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return repr(value)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]


def main() -> None:
    results = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)

    def emit(**record):
        try:
            line = json.dumps(record, default=_jsonable)
        except (TypeError, ValueError, RecursionError) as e:
            line = json.dumps({"i": record.get("i"), "error": "unserialisable result: " + _error(e)})
        results.write(line + "\n")
        results.flush()

    with open("tests.json") as f:
        config = json.load(f)
    fn_name, timeout_s = config["fn_name"], config["timeout_s"]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    try:
        import importlib.util

        spec = importlib.util.spec_from_file_location("solution", "solution.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if hasattr(module, "Solution") and hasattr(module.Solution, fn_name):
            fn = getattr(module.Solution(), fn_name)
        else:
            fn = getattr(module, fn_name)
    except BaseException as e:  # noqa: BLE001 - any failure of the program is a verdict, not a crash
        emit(setup_error=_error(e))
        return

    signal.signal(signal.SIGALRM, _on_alarm)
    for i, args in enumerate(config["args"]):
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            result = fn(*args)
            signal.setitimer(signal.ITIMER_REAL, 0)
            emit(i=i, result=result)
        except _TestTimeout:
            emit(i=i, error=f"timed out after {timeout_s:g}s")
        except BaseException as e:  # noqa: BLE001
            signal.setitimer(signal.ITIMER_REAL, 0)
            emit(i=i, error=_error(e))


if __name__ == "__main__":
    main()
