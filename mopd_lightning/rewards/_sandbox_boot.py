"""First code that runs inside the sandbox: lock the process down, then run the untrusted program.

Not imported by the library: ``sandbox.py`` starts it as ``python -I -S _sandbox_boot.py CONFIG`` (inside fresh
namespaces when the machine allows them). Doing the lock-down here, in the same interpreter that then runs the
program, costs a few system calls instead of a second interpreter start-up, and keeps
``preexec_fn`` (unsafe in a threaded parent) out of the parent.

Order matters: read the program's files and mount the private file systems while still privileged, then set the
resource limits, then give up the privileges (user id, capabilities), and only then run untrusted code.
"""

import json
import os
import resource
import sys

_WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC = 2, 4, 4096, 16384
_PR_SET_NO_NEW_PRIVS, _PR_CAPBSET_DROP = 38, 24


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _mount_tmpfs(libc, target: str, size_mb: int, mode: str) -> None:
    """A fresh, size-capped tmpfs over ``target`` (only this mount namespace sees it)."""
    opts = f"size={size_mb}m,nr_inodes=16384,mode={mode}".encode()
    flags = _MS_NOSUID | _MS_NODEV
    if libc.mount(b"tmpfs", target.encode(), b"tmpfs", flags, opts) != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"mount tmpfs on {target}: {os.strerror(err)}")


def _reveal(libc, hidden: str, keep: list) -> None:
    """Hide ``hidden`` (e.g. root's 0700 home) behind an empty tmpfs, then bind back only the ``keep`` paths.

    Used when the Python installation lives in a folder the sandbox user may not traverse: the interpreter and
    its standard library stay reachable, nothing else of that folder is.
    """
    fds = [os.open(path, os.O_PATH) for path in keep]
    _mount_tmpfs(libc, hidden, 1, "0755")
    for path, fd in zip(keep, fds):
        os.makedirs(path, mode=0o755, exist_ok=True)
        if libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, _MS_BIND | _MS_REC, None) != 0:
            import ctypes

            raise OSError(ctypes.get_errno(), f"bind mount {path}")
        os.close(fd)


def _private_file_systems(libc, workdir: str, size_mb: int) -> None:
    """Hide the machine's world-writable folders and make the working folder private, on a fresh tmpfs.

    The program's files are read first, then written into the new working folder: nothing the program writes
    reaches the real disk, and everything vanishes with the mount namespace.
    """
    files = {}
    for name in os.listdir(workdir):
        with open(os.path.join(workdir, name), "rb") as f:
            files[name] = f.read()
    mounted = []
    for folder in _WORLD_WRITABLE:
        if os.path.isdir(folder) and not os.path.islink(folder):
            _mount_tmpfs(libc, folder, size_mb, "1777")
            mounted.append(folder)
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    if not any(workdir.startswith(folder + "/") for folder in mounted):  # else it already is on a fresh tmpfs
        _mount_tmpfs(libc, workdir, size_mb, "0700")
    for name, data in files.items():
        with open(os.path.join(workdir, name), "wb") as f:
            f.write(data)


def _set_limits(limits: dict) -> None:
    for name, value in limits.items():
        soft, hard = value if isinstance(value, list) else (value, value)
        resource.setrlimit(getattr(resource, "RLIMIT_" + name), (soft, hard))


def _drop_user(workdir: str, uid: int, gid: int) -> None:
    """Become the dedicated unprivileged user; it owns the working folder and nothing else."""
    for root, dirs, names in os.walk(workdir):
        for entry in [root] + [os.path.join(root, n) for n in dirs + names]:
            os.chown(entry, uid, gid)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def _drop_capabilities(libc) -> None:
    """Running as (namespace-)root: remove every capability, so the program cannot undo the mounts."""
    import ctypes

    for cap in range(64):
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _block_sockets() -> None:
    """Fallback when no network namespace is available: refuse to create sockets from Python code."""
    import socket

    class _NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("network access is disabled in the sandbox")

    socket.socket = _NoSocket
    socket.create_connection = lambda *a, **k: _NoSocket()
    socket.socketpair = lambda *a, **k: _NoSocket()


def main() -> None:
    config = json.loads(sys.argv[1])
    workdir = config["workdir"]
    libc = _libc()
    if config["private_mounts"]:
        _private_file_systems(libc, workdir, config["disk_mb"])
        for hidden, keep in config["reveal"]:
            _reveal(libc, hidden, keep)
    os.chdir(workdir)
    _set_limits(config["rlimits"])
    if config["uid"] is not None:
        _drop_user(workdir, config["uid"], config["gid"])
    if config["drop_capabilities"]:
        _drop_capabilities(libc)
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # setuid binaries cannot give privileges back
    if config["block_sockets"]:
        _block_sockets()

    _run_as_main(config["script"], config["site_packages"])


def _run_as_main(script: str, site_packages: list) -> None:
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
    with open(script, "rb") as f:
        code = compile(f.read(), script, "exec")
    module = types.ModuleType("__main__")
    module.__file__ = os.path.abspath(script)
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    exec(code, module.__dict__)


if __name__ == "__main__":
    main()
