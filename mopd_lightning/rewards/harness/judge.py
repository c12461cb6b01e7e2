"""The trusted side of a judged HumanEval run (runs in the sandbox after ``plain.py``; never imported).

Runs the problem's prompt (its helper functions) and test, with ``check`` given a stand-in for the candidate that
forwards each call to the program over fds 4 (requests) and 3 (replies) and returns the decoded plain value. The
program never sees the test or this process (another uid, or undumpable), so only the judge can say "passed":
it exits 0 after printing ``PASSED`` only if ``check`` returned.
"""

import builtins
import json
import linecache
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


def _source(name: str, text: str):
    """Compile ``text`` so that tracebacks show its lines (the feedback quotes the failing assert)."""
    linecache.cache[name] = (len(text), None, text.splitlines(True), name)
    return compile(text, name, "exec")


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
    exec(_source("<prompt>", problem["prompt"]), namespace)
    namespace[problem["entry_point"]] = candidate  # some tests call the function by its name
    exec(_source("<test>", problem["test"]), namespace)
    namespace["check"](candidate)
    sys.stdout.write("PASSED\n")
