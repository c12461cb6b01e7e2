"""First code that runs inside the sandbox: lock the process down, then run the untrusted program.

Not imported by the library: ``sandbox.py`` starts it as ``python -I -S _boot.py CONFIG`` (CONFIG: the hex of a
``marshal``-ed dict; ``json`` alone would cost more to import than the rest of the start-up) inside bubblewrap's
namespaces (or, at the ``process`` level, directly). Doing the lock-down here, in the interpreter that then runs
the program, costs a few system calls instead of a second interpreter start-up, and keeps ``preexec_fn`` (unsafe
in a threaded parent) out of the verifier.

A judged run (``config["judge"]``) splits in two after the fork, before any untrusted code runs:

- the *program* (child) gets a fresh uid of the pool where it can, no stdin, no stdout/stderr, and a pair of pipes
  on fds 3 (requests in) and 4 (replies out); it runs ``config["script"]``;
- the *judge* (parent) reads its source, data included, from stdin, which the program never had, and keeps it in
  memory; it is undumpable (no ptrace, no ``/proc/<pid>/fd`` or ``mem`` for others), and runs them with the other ends of the
  pipes on fds 3 (replies in) and 4 (requests out). Only the judge writes to the verifier's stdout.

The config on the command line is visible to every process in the sandbox (``/proc/*/cmdline``): it never holds
tests or expected answers.
"""

import marshal
import os
import resource
import sys

_PR_SET_DUMPABLE, _PR_SET_NO_NEW_PRIVS = 4, 38


def _set_limits(limits: dict) -> None:
    for name, value in limits.items():
        soft, hard = value if isinstance(value, list) else (value, value)
        resource.setrlimit(getattr(resource, "RLIMIT_" + name), (soft, hard))


def _drop_user(uid: int, paths: list) -> None:
    """Become an unprivileged pool user that owns ``paths`` (its working folder) and nothing else."""
    for path in paths:
        for root, dirs, names in os.walk(path):
            for entry in [root] + [os.path.join(root, n) for n in dirs + names]:
                os.chown(entry, uid, uid)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def _block_sockets() -> None:
    """``process`` level only (no network namespace): refuse to create sockets from Python code."""
    import socket

    class _NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("network access is disabled in the sandbox")

    socket.socket = _NoSocket
    socket.create_connection = lambda *a, **k: _NoSocket()
    socket.socketpair = lambda *a, **k: _NoSocket()


def _lock_down(config: dict, uid, owned: list) -> None:
    libc = _libc() if config["no_new_privs"] else None  # loaded while the interpreter's folders are readable
    if config["block_sockets"]:
        _block_sockets()
    _set_limits(config["rlimits"])
    if uid is not None:
        _drop_user(uid, owned)  # a uid change also makes the process undumpable (fs.suid_dumpable is 0)
    if libc is not None:  # bubblewrap has set it already
        _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries cannot give privileges back


def _libc():
    import ctypes  # only where needed: it costs a third of the start-up

    return ctypes.CDLL(None, use_errno=True)


def _prctl(libc, option: int, value: int) -> None:
    if libc.prctl(option, value, 0, 0, 0) != 0:
        import ctypes

        raise OSError(ctypes.get_errno(), f"prctl({option}, {value})")


def _split(config: dict) -> str:
    """Fork the program off (it never returns from here); return the judge's source in the parent."""
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    uids = config["uids"] or [None, None]
    if uids[1] is None:  # same uid for both: keep the program out of the judge's memory and file descriptors
        _prctl(_libc(), _PR_SET_DUMPABLE, 0)
    if os.fork() == 0:  # the program
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.dup2(requests_r, 3)
        os.dup2(replies_w, 4)
        for fd in (null, requests_r, requests_w, replies_r, replies_w):
            if fd > 4:
                os.close(fd)
        os.closerange(5, 256)
        _lock_down(config, uids[0], [config["workdir"]])
        _run_as_main(config["script"], config["site_packages"])
        os._exit(0)
    os.dup2(replies_r, 3)
    os.dup2(requests_w, 4)
    os.closerange(5, 256)
    _lock_down(config, uids[1], [])
    return sys.stdin.read()


def main() -> None:
    config = marshal.loads(bytes.fromhex(sys.argv[1]))
    for name in config["preload"]:  # e.g. what both halves of a judged run import: paid once, before the fork
        __import__(name)
    if config["inputs"]:
        for name in os.listdir(config["inputs"]):
            with open(os.path.join(config["inputs"], name), "rb") as src:
                with open(os.path.join(config["workdir"], name), "wb") as dst:
                    dst.write(src.read())
    os.chdir(config["workdir"])
    if config["judge"]:
        source = _split(config)  # kept in memory: the program may read every file of the sandbox
        _run_as_main("judge.py", config["site_packages"], source=source)
        sys.stdout.flush()
        os._exit(0)  # the verdict is out; interpreter shutdown would only add time
    _lock_down(config, (config["uids"] or [None])[0], [config["workdir"]])
    _run_as_main(config["script"], config["site_packages"])


def _run_as_main(script: str, site_packages: list, source=None) -> None:
    """Run ``script`` as ``__main__``, as ``python script`` would, but without a second interpreter start-up.

    The interpreter starts with ``-S`` (no ``site``): ``.pth`` hooks of the verifier's environment (editable
    installs) cost more than the whole sandbox. Third-party packages stay importable through ``site_packages``;
    ``exit``/``quit``, which ``site`` normally defines, are provided here.
    """
    import builtins
    import types

    def _quit(code=None):
        raise SystemExit(code)

    builtins.exit = builtins.quit = _quit
    sys.path[:0] = [os.getcwd()]
    sys.path.extend(site_packages)
    sys.argv = [script]
    if source is None:
        with open(script, "rb") as f:
            source = f.read()
    code = compile(source, script, "exec")
    module = types.ModuleType("__main__")
    module.__file__ = os.path.abspath(script)
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    exec(code, module.__dict__)


if __name__ == "__main__":
    main()
