"""The pool of unprivileged user ids that sandboxed programs run as (when the verifier runs as root).

One uid per concurrent program, so that ``RLIMIT_NPROC`` (counted per user) bounds one run alone and one run
cannot signal, trace or read another. A uid is held with a file lock, so other verifier processes respect it too,
and it is handed out only once nothing runs under it any more.
"""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import signal
import time
from contextlib import ExitStack, contextmanager
from typing import Collection, Iterator, List

SANDBOX_UID_BASE = int(os.environ.get("MOPD_SANDBOX_UID_BASE", "64000"))
"""First user id of the pool (ids ``BASE .. BASE+SANDBOX_UID_COUNT-1``, none with a passwd entry)."""
SANDBOX_UID_COUNT = 128
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
LOCK_DIR = os.environ.get("MOPD_SANDBOX_LOCK_DIR", "/run/mopd-sandbox-uids")
"""The pool's lock files: one folder for the whole machine, whatever each verifier's ``TMPDIR`` (a private one
would split the pool, and two jobs could hand out the same uid), and outside the world-writable folders, where
files are what programs leave behind. Only root uses the pool, and ``/run`` is root's."""


def pids_of(uids: Collection[int]) -> List[int]:
    """Live processes owned by any of ``uids`` (zombies included until reaped)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid in uids:
                pids.append(int(entry))
        except OSError:
            pass
    return pids


def kill_uids(uids: Collection[int], patience_s: float = 1.0) -> bool:
    """SIGKILL every process of ``uids`` until none is left; False if some outlived ``patience_s``."""
    deadline = time.monotonic() + patience_s
    while True:
        pids = pids_of(uids) if uids else []
        if not pids:
            return True
        if time.monotonic() > deadline:
            return False
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.005)


def remove_files_of(uid: int) -> None:
    """Delete what ``uid`` left in the machine's world-writable folders (``process`` level only: no private /tmp)."""
    for folder in WORLD_WRITABLE:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass


def _lock_dir() -> str:
    folder = LOCK_DIR
    os.makedirs(folder, mode=0o700, exist_ok=True)
    st = os.lstat(folder)
    if st.st_uid != os.geteuid() or not os.path.isdir(folder) or os.path.islink(folder):
        raise RuntimeError(f"refusing to use {folder}: not a directory owned by this user")
    return folder


@contextmanager
def _one_uid(folder: str) -> Iterator[int]:
    start = random.randrange(SANDBOX_UID_COUNT)
    while True:
        for i in range(SANDBOX_UID_COUNT):
            uid = SANDBOX_UID_BASE + (start + i) % SANDBOX_UID_COUNT
            fd = os.open(os.path.join(folder, str(uid)), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield uid
            finally:
                os.close(fd)  # releases the lock
            return
        time.sleep(0.01)


@contextmanager
def claimed_uids(n: int) -> Iterator[List[int]]:
    """Hold ``n`` distinct uids of the pool for the duration of a run, none with a live process (leftovers of a
    verifier that died mid-run are killed first); at the end, kill whatever still runs under them."""
    if n == 0:
        yield []
        return
    folder = _lock_dir()
    with ExitStack() as stack:
        uids = [stack.enter_context(_one_uid(folder)) for _ in range(n)]
        if not kill_uids(uids):
            raise RuntimeError(f"sandbox uids {uids} keep processes that SIGKILL does not remove")
        try:
            yield uids
        finally:
            kill_uids(uids)
