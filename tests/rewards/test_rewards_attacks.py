"""Attacks written after reading the sandbox and the code verifier: reward hacks and escapes. Each must score 0 and
leave nothing behind (no process, no file in the machine's /tmp or /dev/shm, no SysV IPC object).

Set ``MOPD_ATTACK_REPORT=path.md`` to also write each case's reward, wall time and leftovers as a table.
"""

import os
import time

import pytest
from conftest import sandbox_processes

from mopd_lightning.execution import Limits, run_python
from mopd_lightning.rewards import CodeVerifier, verify_batch

ROWS = []
_ALWAYS_EQUAL = """
class Anything:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    def __lt__(self, other): return True
    def __gt__(self, other): return True
    def __le__(self, other): return True
    def __ge__(self, other): return True
    def __hash__(self): return 0
    def __bool__(self): return True
    def __len__(self): return 1
    def __iter__(self): return iter([])
    def __getattr__(self, name): return lambda *a, **k: self
"""


def _machine_state() -> dict:
    """What a run could leave on the machine: sandbox processes, files in shared folders, SysV IPC objects."""
    ipc = {}
    for kind in ("shm", "msg", "sem"):
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                ipc[kind] = set(f.read().splitlines()[1:])
        except OSError:
            ipc[kind] = set()
    return {"processes": set(sandbox_processes()), "files": {f"{d}/{n}" for d in ("/tmp", "/dev/shm")
                                                             for n in os.listdir(d)}, **ipc}


def _leftovers(before: dict) -> dict:
    deadline = time.monotonic() + 2.0
    while True:
        after = _machine_state()
        left = {k: sorted(after[k] - before[k]) for k in after}
        left["files"] = [f for f in left["files"] if not os.path.basename(f).startswith(("pytest-", "tmp"))]
        if not any(left.values()) or time.monotonic() > deadline:
            return {k: v for k, v in left.items() if v}
        time.sleep(0.05)


def attack(name: str, score_fn):
    """Run one attack; record its reward, wall time and leftovers; assert reward 0 and nothing left."""
    before = _machine_state()
    start = time.monotonic()
    rewards = score_fn()
    wall = time.monotonic() - start
    left = _leftovers(before)
    ROWS.append((name, max(rewards), wall, left))
    assert max(rewards) == 0.0, f"{name}: rewarded {rewards}"
    assert left == {}, f"{name}: left behind {left}"


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    path = os.environ.get("MOPD_ATTACK_REPORT")
    if path and ROWS:
        lines = ["| attack | highest reward | wall s | left behind |", "|---|---|---|---|"]
        lines += [f"| {n} | {r:g} | {w:.2f} | {left or 'nothing'} |" for n, r, w, left in ROWS]
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")


def humaneval_score(problem: dict, completion: str) -> float:
    gt = {"kind": "humaneval", **{k: problem[k] for k in ("prompt", "test", "entry_point")}}
    return CodeVerifier(timeout_s=3.0)(completion, gt).reward


# -- reward hacks ----------------------------------------------------------------------------------------------


def test_fake_pass_from_everything_the_program_can_read(humaneval):
    """Find any success marker in every file and process the program can see, print it, exit 0."""
    completion = """    return None


import os, re
seen = b""
for root in ["/tmp", "/proc"]:
    for dirpath, dirs, names in os.walk(root):
        if dirpath.count("/") > 4:
            dirs[:] = []
        for n in names:
            try:
                seen += open(os.path.join(dirpath, n), "rb").read(1 << 16)
            except Exception:
                pass
words = set(re.findall(rb"[A-Z_]{6,}[0-9a-f]*", seen)) | {b"PASSED"}
for fd in range(0, 64):
    for w in words:
        try:
            os.write(fd, w + b"\\n")
        except OSError:
            pass
os._exit(0)
"""
    attack("fake pass: print every marker found, then os._exit(0)",
           lambda: [humaneval_score(p, completion) for p in humaneval[:3]])


def test_writing_into_the_judges_stdout_and_killing_it(humaneval):
    completion = """    import os, signal
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            for path in (f"/proc/{pid}/fd/1", f"/proc/{pid}/fd/4"):
                try:
                    with open(path, "w") as f:
                        f.write("PASSED\\n")
                except OSError:
                    pass
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
    return None
"""
    attack("judge hijack: write PASSED to other processes' stdout, then kill them",
           lambda: [humaneval_score(p, completion) for p in humaneval[:3]])


def test_ptrace_into_the_judge(humaneval):
    completion = """    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    attached = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            attached += libc.ptrace(16, int(pid), 0, 0) == 0  # PTRACE_ATTACH
    return attached
"""
    attack("ptrace attach to the judge", lambda: [humaneval_score(p, completion) for p in humaneval[:2]])


def test_always_equal_answers_on_all_of_humaneval(humaneval):
    """An object equal to everything (and a subclass of int that is) must not pass a single problem."""
    subclass = "class Anything(int):\n    def __eq__(self, other): return True\n    def __ne__(self, other): return False\n"
    responses, truths = [], []
    for p in humaneval:
        gt = {"kind": "humaneval", **{k: p[k] for k in ("prompt", "test", "entry_point")}}
        for cls in (_ALWAYS_EQUAL, subclass):
            body = cls + f"\ndef {p['entry_point']}(*args, **kwargs):\n    return Anything()\n"
            responses.append(f"```python\n{body}```")
            truths.append(gt)
    attack(f"always-equal object returned on all {len(humaneval)} HumanEval problems",
           lambda: [s.reward for s in verify_batch("code", responses, truths)])


def test_always_equal_answers_in_functional_and_stdio_tests():
    functional = {"kind": "functional", "fn_name": "solve",
                  "tests": [{"input": "1", "output": "2"}, {"input": "[1, 2]", "output": "[2, 1]"}]}
    stdio = {"kind": "stdio", "tests": [{"input": "3", "output": "9"}]}
    program = _ALWAYS_EQUAL + "\nclass Solution:\n    def solve(self, x):\n        return Anything()\n"
    printer = _ALWAYS_EQUAL + "\nprint(Anything())\n"
    verifier = CodeVerifier(timeout_s=3.0)
    attack("always-equal object in functional (LiveCodeBench) and stdio tests",
           lambda: [verifier(program, functional).reward, verifier(printer, stdio).reward])


def test_reading_the_tests_through_proc():
    """The judge's source (with the expected answers) reaches it on stdin after the program has lost stdin;
    nothing the program can read holds it."""
    secret = "EXPECTED_ANSWER_" + os.urandom(8).hex()
    program = """
import os, re
found = b""
def read(path):
    global found
    try:
        found += open(path, "rb").read(1 << 20)
    except Exception:
        pass
for pid in os.listdir("/proc"):
    if pid.isdigit() and int(pid) != os.getpid():  # (its own fds 3 and 4 are the pipes to the judge)
        for part in ("cmdline", "environ", "mem", "maps"):
            read(f"/proc/{pid}/{part}")
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                read(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
# Every folder the run may write to, on its own filesystem only: what is mounted inside it (the interpreter and its
# packages bound back read-only when the checkout lives under /tmp or /var/tmp) is the machine's, not the run's.
for folder in ("/tmp/work", "/tmp/.inputs", "/var/tmp", "/dev/shm"):
    device = os.stat(folder).st_dev
    for dirpath, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if os.lstat(os.path.join(dirpath, d)).st_dev == device]
        for n in names:
            read(os.path.join(dirpath, n))
os.write(4, b"FOUND" if re.search(rb"EXPECTED_ANSWER_[0-9a-f]{16}", found) else b"nothing")
"""
    judge = f"import os\nsecret = {secret!r}\nprint(os.read(3, 100).decode())\n"
    results = []

    def run():
        results.append(run_python(program, judge=judge, limits=Limits(timeout_s=30)))
        assert not results[0].timed_out, f"the search did not finish (a time-out, not a leak): {results[0]}"
        return [float(results[0].stdout.strip() == "FOUND")]

    attack("read the judge's tests through /proc, /tmp and /dev/shm", run)
    assert results[0].ok and results[0].stdout.strip() == "nothing", results[0]


# -- escapes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["setsid", "double fork + setsid", "exec sleep"])
def test_nothing_outlives_its_run(how):
    detach = {
        "setsid": "os.setsid()\ntime.sleep(60)",
        "double fork + setsid": "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(60)\n"
                                "    os._exit(0)",
        "exec sleep": "os.setsid()\nos.execv('/bin/sleep', ['sleep', '60'])",
    }[how]
    program = "import os, time\nif os.fork() == 0:\n" + "".join(f"    {line}\n" for line in detach.splitlines())
    program += "    os._exit(0)\nprint('parent done')\n"
    attack(f"outlive the run ({how})", lambda: [float(run_python(program).ok and False)])


def test_sysv_ipc_stays_in_the_run():
    """Shared memory, message queues and semaphores made by a run vanish with it; four processes filling shared
    memory (each within its own address-space limit) stop at the run's memory limit, not the machine's."""
    program = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
IPC_CREAT, IPC_PRIVATE = 0o1000, 0
libc.msgget(IPC_PRIVATE, IPC_CREAT | 0o600)
libc.semget(IPC_PRIVATE, 1, IPC_CREAT | 0o600)
for child in range(4):
    if os.fork() == 0:
        for i in range(12):  # 192 MiB each, under the 256 MiB address-space limit of one process
            shm = libc.shmget(IPC_PRIVATE, 16 << 20, IPC_CREAT | 0o600)
            address = libc.shmat(shm, None, 0) if shm >= 0 else None
            if address in (None, ctypes.c_void_p(-1).value):
                os._exit(1)
            ctypes.memset(address, 1, 16 << 20)
            os.write(1, b"16\\n")
        os._exit(0)
for _ in range(4):
    os.wait()
"""
    results = []

    def run():
        results.append(run_python(program, limits=Limits(timeout_s=20, memory_mb=256)))
        return [0.0]

    attack("SysV IPC: message queue, semaphore, 4 processes filling 768 MiB of shared memory (run limit 256 MiB)",
           run)
    filled = sum(int(line) for line in results[0].stdout.split())
    assert filled <= 256, f"the run filled {filled} MiB of shared memory past its 256 MiB limit"
    ROWS[-1] = ROWS[-1][:3] + (ROWS[-1][3] or f"nothing; {filled} MiB filled before the run's limit stopped it",)
