"""A worker process (``python -m mopd_lightning.execution._worker READ_FD WRITE_FD``).

Receives pickled ``(function, args)`` calls on one pipe and answers each with a pickled ``("ok", result)`` or
``("error", "ExceptionType: message")`` on the other.
Verifier code runs in this process's main thread, where ``signal.alarm`` (math-verify's time limit) works.
"""

import os
import pickle
import struct
import sys

_HEADER = struct.Struct("<Q")


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    return data if data is not None and len(data) == n else b""


def main() -> None:
    requests = os.fdopen(int(sys.argv[1]), "rb")
    replies = os.fdopen(int(sys.argv[2]), "wb")
    try:
        import math_verify  # noqa: F401  (pay the sympy import once, before the first request)
    except ImportError:
        pass
    while True:
        header = _read_exact(requests, _HEADER.size)
        if not header:
            return  # the parent closed the pipe
        request = _read_exact(requests, _HEADER.unpack(header)[0])
        try:
            fn, args = pickle.loads(request)
            payload = pickle.dumps(("ok", fn(*args)))
        except Exception as e:  # noqa: BLE001 - the caller decides what a failed call means; the worker lives on
            payload = pickle.dumps(("error", f"{type(e).__name__}: {str(e)[:200]}"))
        replies.write(_HEADER.pack(len(payload)) + payload)
        replies.flush()


if __name__ == "__main__":
    main()
