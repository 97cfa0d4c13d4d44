"""The memory watchdog (runsc where no writable cgroup exists) ends a sandbox holding more
than ``Limits.memory`` at a sample.

gVisor keeps its processes' memory in its own memory file, not in the resident memory of
the sandbox's host processes: a watchdog summing their RSS let a command hold 600 MiB under
a 256 MiB limit for seconds and exit 0 (seen here, 2026-12-07). A single allocation held is
what these tests use; the watchdog is forced as root, and is what an ordinary user gets.
It is not claimed to see a burst allocated and freed between two samples, and no test here
relies on one being seen.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest
from support.user_switch import world_readable_copy

from gvisor_magic import IsolatedSession, Limits, run_command_isolated
from gvisor_magic.request import MiB

USER = "gvm-reaper-probe"
SYSTEM_PYTHON = "/usr/bin/python3"
ROOT = Path(__file__).resolve().parent.parent.parent
#: One allocation of 600 MiB, held: over a 256 MiB limit at every sample after it.
HOLD = ("import os, time\n"
        "if os.uname().release != '4.4.0': print('NOT-GVISOR'); raise SystemExit(99)\n"
        "print('inside', flush=True)\n"
        "held = b'\\x01' * (600 << 20)\n"
        "print('allocated', flush=True)\n"
        "time.sleep(60)\n"
        "print('survived', flush=True)\n")
LIMITS = Limits(memory=256 * MiB)


def _killed_for_memory(result) -> None:
    assert "NOT-GVISOR" not in result.stdout
    assert "inside" in result.stdout, result.describe()
    assert "survived" not in result.stdout, result.describe()
    assert result.returncode == 137 and not result.timed_out, result.describe()
    assert "memory limit" in (result.error or "") and "watchdog" in result.error, \
        result.describe()


@pytest.mark.parametrize("flavour", ["one-shot", "session"])
def test_the_watchdog_ends_a_sandbox_holding_600_mib_under_256(flavour, monkeypatch,
                                                               runsc_works):
    monkeypatch.setenv("GVISOR_MAGIC_MEMORY_GUARD", "watchdog")
    argv = ["python3", "-c", HOLD]
    if flavour == "session":
        with IsolatedSession(mode="runsc", limits=LIMITS) as session:
            result = session.run(argv, timeout=120)
            after = session.run("echo still-works")
        assert after.stdout == "still-works\n", after.describe()
    else:
        result = run_command_isolated(argv, mode="runsc", limits=LIMITS, timeout=120,
                                      reuse=False)
    _killed_for_memory(result)


def _processes_of(uid: int, work: str) -> list[psutil.Process]:
    """The user's processes, and the sandbox's (which may run as a subordinate uid: they are
    found by their state dir, under the user's TMPDIR)."""
    found = []
    for process in psutil.process_iter(["uids", "cmdline"]):
        try:
            if (process.info["uids"].real == uid
                    or work in " ".join(process.info["cmdline"] or [])) \
                    and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.Error, AttributeError):
            continue
    return found


USER_RUN = r'''
import json, sys
from gvisor_magic import Limits, run_command_isolated
from gvisor_magic.memory import mechanism
from gvisor_magic.request import MiB
r = run_command_isolated(["python3", "-c", sys.argv[1]], mode="runsc", timeout=120,
                         limits=Limits(memory=256 * MiB), reuse=False)
print(json.dumps({"mechanism": mechanism(), "returncode": r.returncode, "stdout": r.stdout,
                  "error": r.error, "timed_out": r.timed_out, "describe": r.describe()}))
'''


def test_the_watchdog_holds_for_an_ordinary_user(runsc_works, request):
    """Where the watchdog is what there is: an ordinary user, no writable cgroup."""
    if os.geteuid() != 0:
        pytest.skip("already an ordinary user: the test above covers this")
    for tool in ("useradd", "runuser", "newuidmap"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is needed (make test installs it)")
    try:
        uid = pwd.getpwnam(USER).pw_uid
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", USER], check=True)
        uid = pwd.getpwnam(USER).pw_uid
    work = tempfile.mkdtemp(prefix="gvm-watchdog-", dir="/var/tmp")
    os.chmod(work, 0o777)
    readable = world_readable_copy(ROOT / "gvisor_magic", Path(psutil.__file__).parent)
    try:
        done = subprocess.run(
            [shutil.which("runuser"), "-u", USER, "--", SYSTEM_PYTHON, "-c", USER_RUN, HOLD],
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": readable, "HOME": work,
                 "TMPDIR": work, "LANG": "C.UTF-8"}, cwd=work, capture_output=True,
            text=True, timeout=300)
        left = _processes_of(uid, work)
    finally:
        for process in _processes_of(uid, work):
            process.kill()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(readable, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not left, f"the user's sandbox outlived its run: {[p.pid for p in left]}"
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["mechanism"] == "watchdog", found
    assert "inside" in found["stdout"] and "survived" not in found["stdout"], found
    assert found["returncode"] == 137 and not found["timed_out"], found
    assert "memory limit" in found["error"] and "watchdog" in found["error"], found
    request.node.user_properties.append(("security", {
        "probe": "memory held over the limit (watchdog)", "backend": "runsc",
        "flavour": "one-shot", "outcome": "blocked", "evidence": "as an ordinary user, 600 "
        f"MiB held under a 256 MiB limit: {found['describe']}"}))
