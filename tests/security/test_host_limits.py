"""The subprocess backend's own rlimits hold a fork bomb, run by an ordinary user.

Root ignores RLIMIT_NPROC, so the bomb runs as a dedicated unprivileged user
with a small ``max_processes``; the runner's process-group kill ends it at the
timeout. Nothing of that user may be left running afterwards.
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

#: One user per test process: RLIMIT_NPROC counts every process of a real uid, so another
#: suite on the machine running its bomb as the same user would share (and break) the limit.
USER = f"gvm-bomb-{os.getpid()}"
SYSTEM_PYTHON = "/usr/bin/python3"
ROOT = Path(__file__).resolve().parent.parent.parent

BOMB = r'''
import json, sys
from gvisor_magic import Limits, run_command_isolated
r = run_command_isolated("bomb() { bomb | bomb & }; bomb; sleep 600", mode="subprocess",
                         timeout=3, limits=Limits(max_processes=40))
print(json.dumps({"describe": r.describe(), "timed_out": r.timed_out, "isolated": r.isolated,
                  "forks_refused": "fork" in r.stderr.lower()}))
'''


def _user_processes(uid: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["uids"]):
        try:
            if process.info["uids"].real == uid and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.Error, AttributeError):
            continue
    return found


@pytest.fixture
def ordinary_user():
    if os.geteuid() != 0:
        pytest.skip("needs root to create the unprivileged user that runs the bomb")
    if not shutil.which("useradd") or not shutil.which("runuser"):
        pytest.fail("useradd and runuser are needed (make test installs them)")
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", USER], check=True)
        entry = pwd.getpwnam(USER)
    assert not _user_processes(entry.pw_uid), "the probe user is busy: another run?"
    try:
        yield entry
    finally:
        subprocess.run(["userdel", USER], check=False, capture_output=True)


def test_fork_bomb_on_the_host_is_held_by_rlimits(ordinary_user, request):
    uid = ordinary_user.pw_uid
    work = tempfile.mkdtemp(prefix="gvm-hostbomb-", dir="/var/tmp")
    os.chmod(work, 0o755)
    # The package and psutil, copied where the ordinary user can read them (the clone and
    # its venv may be private).
    readable = world_readable_copy(ROOT / "gvisor_magic", Path(psutil.__file__).parent)
    try:
        done = subprocess.run(
            [shutil.which("runuser"), "-u", USER, "--", SYSTEM_PYTHON, "-c", BOMB],
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": readable, "HOME": work,
                 "TMPDIR": work}, cwd=work, capture_output=True, text=True, timeout=120)
        left = _user_processes(uid)
        for process in left:
            process.kill()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(readable, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["timed_out"] and not found["isolated"], found
    assert not left, f"the bomb outlived its timeout: {len(left)} processes"
    request.node.user_properties.append(("security", {
        "probe": "fork bomb", "backend": "subprocess", "flavour": "one-shot",
        "outcome": "blocked", "evidence": "as an ordinary user, max_processes=40 (RLIMIT_NPROC) "
        f"and the process-group kill: {found['describe']}"}))
