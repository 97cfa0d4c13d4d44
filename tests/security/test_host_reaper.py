"""Nothing a command starts on the host outlives it: the subprocess backend's reaper.

The subprocess backend runs commands on the host, unisolated. Its promise is narrow but
must hold: when the command returns, everything it started is gone. A chain of processes
that each call ``setsid`` and fork the next (some parents exit, some sleep) leaves the
command's process group and, level by level, its parentage: killing one level per round
once left 70-83 of 120 such processes running on the host after the command returned.

The chain is bounded (120 levels, never a bomb) and every process of it carries a unique
word in its environment: each test counts the host's processes carrying it after the
command returned (it must be 0), and its own cleanup kills any that are left, so a failing
test leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from support.user_switch import world_readable_copy

from gvisor_magic import run_command_isolated
from gvisor_magic.backends import reaper

LEVELS = 120
MARK = "GVM_REAPER_TEST_MARK"
USER = "gvm-reaper-probe"
SYSTEM_PYTHON = "/usr/bin/python3"
ROOT = Path(__file__).resolve().parent.parent.parent

#: argv[1] levels. Each level calls setsid and forks the next, then sleeps, except the second,
#: which exits (its child is re-parented). The last level says the chain is complete; the
#: first process prints "chain ready" and returns.
CHAIN = r'''
import os, sys, time
levels = int(sys.argv[1])
ready_r, ready_w = os.pipe()
for level in range(levels):
    if os.fork():
        if level == 0:
            os.close(ready_w)
            os.read(ready_r, 1)
            print("chain ready", flush=True)
            sys.exit(0)
        if level == 1:
            os._exit(0)
        time.sleep(600)
        os._exit(0)
    os.setsid()
os.write(ready_w, b"x")
time.sleep(600)
'''


#: The same chain, but its first process waits too: the command runs until its timeout.
WAITING = CHAIN.replace('print("chain ready", flush=True)\n            sys.exit(0)',
                        'print("chain ready", flush=True)\n            time.sleep(600)')
assert WAITING != CHAIN
#: Ample for 120 forks on a loaded machine; the chain says when it is complete.
TIMEOUT = 20.0
ENDINGS = ["returns", "times out"]


def marked(token: str) -> list[int]:
    """Live (non-zombie) host processes whose environment carries ``MARK=token``."""
    needle = f"{MARK}={token}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:
                if needle not in handle.read().split(b"\0"):
                    continue
            with open(f"/proc/{name}/stat", "rb") as handle:
                if handle.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
        except OSError:
            continue
        found.append(int(name))
    return found


def kill_marked(token: str) -> int:
    """The test's own cleanup: SIGKILL everything carrying the mark until none is left."""
    survivors = marked(token)
    first = len(survivors)
    deadline = time.monotonic() + 30
    while survivors and time.monotonic() < deadline:
        for pid in survivors:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        survivors = marked(token)
    assert not survivors, f"could not clean up {len(survivors)} marked processes"
    return first


@pytest.fixture
def token() -> Iterator[str]:
    word = uuid.uuid4().hex
    try:
        yield word
    finally:
        kill_marked(word)


def test_the_reaper_alone_ends_a_setsid_chain(token):
    """The reaper program by itself (no cgroup involved): when the command returns, the
    whole chain is gone, orphans and new sessions included."""
    # Files, not pipes: a survivor holding a pipe would keep run() waiting.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        done = subprocess.run(
            [sys.executable, "-I", "-S", reaper.__file__, "0", str(os.getpid()), "-",
             sys.executable, "-c", CHAIN, str(LEVELS)],
            env={**os.environ, MARK: token}, stdout=out, stderr=err, timeout=120)
        left = marked(token)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    assert stdout == "chain ready\n", stderr
    assert done.returncode == 0, stderr
    assert not left, f"{len(left)} processes of the chain outlived the command"


@pytest.mark.parametrize("ending", ENDINGS)
def test_a_setsid_chain_leaves_nothing_on_the_host(token, request, ending):
    """Through the backend, as this user (root here: the command runs in a cgroup), when
    the command returns and when its timeout ends it."""
    chain, timeout = (CHAIN, 120.0) if ending == "returns" else (WAITING, TIMEOUT)
    result = run_command_isolated([sys.executable, "-c", chain, str(LEVELS)],
                                  mode="subprocess", env={MARK: token}, timeout=timeout)
    left = marked(token)
    assert result.stdout == "chain ready\n", result.describe()
    assert result.timed_out == (ending == "times out") and not result.isolated, \
        result.describe()
    if ending == "returns":
        assert result.returncode == 0, result.describe()
    assert not result.error, result.error
    assert not left, f"{len(left)} processes of the chain outlived the command"
    request.node.user_properties.append(("security", {
        "probe": "setsid chain", "backend": "subprocess", "flavour": "one-shot",
        "outcome": "blocked", "evidence": f"{LEVELS} levels of setsid+fork, as uid "
        f"{os.geteuid()}: 0 processes left when the command ended ({ending})"}))


def test_the_cgroup_ends_the_chain_even_when_the_reaper_is_killed(token):
    """Where a cgroup can be made (root here), it holds whatever the command started: the
    reaper is SIGKILLed once the chain is complete (its 119 setsid levels are then
    re-parented to init, out of any tree), and still nothing is left."""
    from gvisor_magic.backends.subprocess import _RunCgroup

    probe = _RunCgroup.make()
    if probe is None:
        pytest.skip("no cgroup can be made by this user here: the reaper alone is tested")
    probe.remove()
    killed = []

    def kill_the_reaper(stream: str, text: str) -> None:
        if "chain ready" in text and not killed:
            for pid in marked(token):
                with contextlib.suppress(psutil.Error):
                    if psutil.Process(pid).ppid() == os.getpid():
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)

    # The first level waits, so that the chain is complete when the reaper dies.
    result = run_command_isolated([sys.executable, "-c", WAITING, str(LEVELS)],
                                  mode="subprocess", env={MARK: token}, timeout=120,
                                  on_output=kill_the_reaper)
    left = marked(token)
    assert killed and result.stdout == "chain ready\n", result.describe()
    assert result.returncode == -signal.SIGKILL and not result.timed_out, result.describe()
    assert not left, f"{len(left)} processes of the chain outlived the command"
    assert not result.error, result.error


USER_RUN = r'''
import json, sys
from gvisor_magic import run_command_isolated
chain, levels, mark, token, timeout = sys.argv[1:]
r = run_command_isolated([sys.executable, "-c", chain, levels], mode="subprocess",
                         env={mark: token}, timeout=float(timeout))
print(json.dumps({"stdout": r.stdout, "returncode": r.returncode, "error": r.error,
                  "timed_out": r.timed_out, "describe": r.describe()}))
'''


@pytest.fixture
def ordinary_user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("already an ordinary user: test_a_setsid_chain_leaves_nothing_on_the_host")
    if not shutil.which("useradd") or not shutil.which("runuser"):
        pytest.fail("useradd and runuser are needed (make test installs them)")
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", USER], check=True)
        return pwd.getpwnam(USER)


@pytest.mark.parametrize("ending", ENDINGS)
def test_a_setsid_chain_run_by_an_ordinary_user_leaves_nothing(ordinary_user, token, request,
                                                               ending):
    """An ordinary user cannot make a cgroup here: the reaper alone must end the chain,
    when the command returns and when its timeout ends it."""
    import json

    chain, timeout = (CHAIN, 120.0) if ending == "returns" else (WAITING, TIMEOUT)

    work = tempfile.mkdtemp(prefix="gvm-reaper-", dir="/var/tmp")
    os.chmod(work, 0o755)
    # The package and psutil, copied where the ordinary user can read them (the clone and
    # its venv may be private); the user runs the system's Python.
    readable = world_readable_copy(ROOT / "gvisor_magic", Path(psutil.__file__).parent)
    try:
        done = subprocess.run(
            [shutil.which("runuser"), "-u", USER, "--", SYSTEM_PYTHON, "-c", USER_RUN,
             chain, str(LEVELS), MARK, token, str(timeout)],
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": readable, "HOME": work,
                 "TMPDIR": work}, cwd=work, capture_output=True, text=True, timeout=180)
        left = marked(token)
    finally:
        kill_marked(token)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(readable, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["stdout"] == "chain ready\n", found
    assert found["timed_out"] == (ending == "times out"), found
    if ending == "returns":
        assert found["returncode"] == 0, found
    assert not found["error"], found
    assert not left, f"{len(left)} processes of the chain outlived the command"
    request.node.user_properties.append(("security", {
        "probe": "setsid chain (ordinary user)", "backend": "subprocess",
        "flavour": "one-shot", "outcome": "blocked", "evidence": f"{LEVELS} levels of "
        f"setsid+fork as an ordinary user: 0 processes left when the command ended "
        f"({ending})"}))
