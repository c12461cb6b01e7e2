"""The trusted side of a judged HumanEval run (runs in the sandbox after ``plain.py``; never imported).

Runs the problem's prompt (its helper functions) and test, with ``check`` given a stand-in for the candidate that
forwards each call to the program over fds 4 (requests) and 3 (replies) and returns the decoded plain value. The
program never sees the test or this process (another uid, or undumpable), so only the judge can say "passed":
it exits 0 after printing ``PASSED`` only if ``check`` returned.
"""

import builtins
import json
import os
import sys


class ProgramFailed(Exception):
    """The program raised, or died, while answering a call."""


def _rebuilt(error: str) -> BaseException:
    """The program's exception as the built-in type it names (tests may expect one), else ProgramFailed."""
    name, _, message = error.partition(": ")
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message)
        except Exception:  # noqa: BLE001 - exception types with unusual constructors
            pass
    return ProgramFailed(error)


def _fail_with_traceback(sources: dict) -> None:
    """Print the traceback with the prompt's and test's lines (the feedback quotes the failing assert), exit 1.

    Imported only on failure: ``linecache`` and ``traceback`` cost more than a passing run's whole judge.
    """
    import linecache
    import traceback

    for name, text in sources.items():
        linecache.cache[name] = (len(text), None, text.splitlines(True), name)
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)


def judge(problem: dict) -> None:
    replies, requests = os.fdopen(3, "r"), os.fdopen(4, "w")

    def receive() -> dict:
        line = replies.readline()
        if not line:
            raise ProgramFailed("the program exited or was killed")
        return json.loads(line)

    hello = receive()
    if "setup_error" in hello:
        raise ProgramFailed("the program failed to load: " + str(hello["setup_error"]))

    def candidate(*args, **kwargs):
        requests.write(json.dumps({"args": encode(list(args)), "kwargs": encode(kwargs)}) + "\n")
        requests.flush()
        answer = receive()
        if "ok" not in answer:
            raise _rebuilt(str(answer.get("error")))
        return decode(answer["ok"])

    namespace = {"__name__": "__judge__", "__builtins__": builtins}
    sources = {"<prompt>": problem["prompt"], "<test>": problem["test"]}
    try:
        exec(compile(sources["<prompt>"], "<prompt>", "exec"), namespace)
        namespace[problem["entry_point"]] = candidate  # some tests call the function by its name
        exec(compile(sources["<test>"], "<test>", "exec"), namespace)
        namespace["check"](candidate)
    except BaseException:  # noqa: BLE001 - any failure of the tests is the verdict
        _fail_with_traceback(sources)
    sys.stdout.write("PASSED\n")
