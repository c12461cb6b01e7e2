"""The program's side of a judged HumanEval run (runs in the sandbox after ``plain.py``; never imported).

Loads ``solution.py`` (prompt + completion), then answers the judge's calls of ``ENTRY_POINT`` read from fd 3 with
plain values written to fd 4, one JSON line each. Everything here runs with the program's privileges, so nothing
in it is trusted: the judge decodes whatever comes back as plain values, and decides.
"""

import json
import os
import sys
import types


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]


def serve(entry_point: str) -> None:
    requests, replies = os.fdopen(3, "r"), os.fdopen(4, "w")

    def reply(**message):
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    try:
        module = types.ModuleType("solution")  # as an import would, without importlib's start-up cost
        module.__file__ = os.path.abspath("solution.py")
        sys.modules["solution"] = module
        with open("solution.py", "rb") as f:
            exec(compile(f.read(), "solution.py", "exec"), module.__dict__)
        fn = getattr(module, entry_point)
    except BaseException as e:  # noqa: BLE001 - a program that fails to load is a verdict, not a crash
        reply(setup_error=_error(e))
        return
    reply(ready=True)
    for line in requests:
        try:
            call = json.loads(line)
            result = fn(*decode(call["args"]), **decode(call["kwargs"]))
            reply(ok=encode(result))
        except BaseException as e:  # noqa: BLE001
            reply(error=_error(e))
