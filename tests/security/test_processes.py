"""Processes: escaping the timeout, outliving the command, reaching host processes."""

from __future__ import annotations

import json
import sys

import pytest
from support.probes import GVISOR_GUARD, GVISOR_RELEASE, PYTHON_GUARD

from gvisor_magic import CommandResult, IsolatedSession, run_command_isolated
from gvisor_magic.warm import POOL

PYTHON = sys.executable
ON_HOST = "not attempted unisolated: it would signal or trace the host's processes"


def _escapes(tag: str) -> str:
    sleeper = f"python3 -c 'import time; time.sleep(600)' {tag}"
    double_fork = ("python3 -c 'import os,time,sys\nif os.fork(): sys.exit()\nos.setsid()\n"
                   f"if os.fork(): sys.exit()\ntime.sleep(600)' {tag}")
    return (f"setsid {sleeper} & ({sleeper} &) ; nohup {sleeper} >/dev/null 2>&1 & "
            f"{sleeper} & disown 2>/dev/null; {double_fork} ; sleep 1; ")


def test_escaping_the_timeout(probe):
    probe.harmless_only(["escape the timeout (setsid, double fork, nohup, disown)",
                         "outlive the command (background, setsid, double fork)"], ON_HOST)
    timed = probe.run_in_gvisor(_escapes(probe.tag) + "sleep 600", timeout=4)
    assert timed.timed_out
    survivors = ""
    if probe.flavour == "session":
        survivors = probe.run(f"ps -e -o args= | grep -c [{probe.tag[0]}]{probe.tag[1:]} "
                              "|| true").stdout.strip()
    probe.verdict("escape the timeout (setsid, double fork, nohup, disown)",
                  survivors not in ("", "0"), f"{timed.describe()}; left inside: "
                  f"{survivors or 'the sandbox is gone'}")
    ended = probe.run_in_gvisor(_escapes(probe.tag) + "echo done", timeout=60)
    survivors = ""
    if probe.flavour == "session":
        survivors = probe.run(f"ps -e -o args= | grep -c [{probe.tag[0]}]{probe.tag[1:]} "
                              "|| true").stdout.strip()
    probe.verdict("outlive the command (background, setsid, double fork)",
                  survivors not in ("", "0"), f"{ended.describe()}; left inside: "
                  f"{survivors or 'the sandbox is gone'}")
    # The harness also checks the host for any process carrying the tag.


REACH = r'''
import ctypes, json, os, signal, sys
pid = int(sys.argv[1])
found = {}
try:
    os.kill(pid, signal.SIGKILL)
    found["kill"] = "ok"
except OSError as exc:
    found["kill"] = "ERR %s" % type(exc).__name__
libc = ctypes.CDLL(None, use_errno=True)
found["ptrace"] = "ret %d errno %d" % (libc.ptrace(16, pid, 0, 0), ctypes.get_errno())
try:
    with open("/proc/%d/mem" % pid, "rb") as handle:
        found["mem"] = "ok"
except OSError as exc:
    found["mem"] = "ERR %s" % type(exc).__name__
print(json.dumps(found), flush=True)
os.kill(-1, signal.SIGKILL)  # everything this process may signal
'''


def test_killing_and_tracing_host_processes(probe, host_canary_process):
    probe.harmless_only(["kill / ptrace a host process", "kill -9 -1"], ON_HOST)
    host, _secret = host_canary_process
    result = probe.run([PYTHON, "-c", PYTHON_GUARD + REACH, str(host.pid)])
    assert "NOT-GVISOR" not in result.stdout
    found = json.loads(result.stdout.strip().splitlines()[0])
    alive = host.is_running() and host.status() != "zombie"
    probe.verdict("kill / ptrace a host process", not alive or found["ptrace"].startswith(
        "ret 0"), json.dumps(found))
    probe.verdict("kill -9 -1", not alive, f"{result.describe()}; host process alive: {alive}")


#: A fork bomb, and sixty processes that each fork and exit in a loop, left in the
#: background by a command whose main process ends after 1.5 s.
BACKGROUND_BOMB = (
    "b() { while :; do b & done; }; b 2>/dev/null & "
    "python3 -c 'import os\nfor _ in range(60):\n    if os.fork() == 0:\n        break\n"
    "else:\n    os._exit(0)\nwhile True:\n    if os.fork(): os._exit(0)' & "
    "sleep 1.5; echo done")


@pytest.mark.parametrize("flavour", ["session", "reused"])
@pytest.mark.parametrize("mode", ["runsc", "docker"])
def test_a_background_fork_bomb_is_killed_whole(mode, flavour, request, tmp_path):
    """Everything the bomb made is killed when the command's main process ends: its result
    comes back (no timeout), the same warm sandbox runs the next command, and nothing of
    the bomb is left there (a session's /tmp marker says it is the same sandbox)."""
    request.getfixturevalue(f"{mode}_works")
    session = IsolatedSession(tmp_path, mode=mode) if flavour == "session" else None

    def run(command: str, **kwargs) -> CommandResult:
        if session is not None:
            return session.run(command, **kwargs)
        return run_command_isolated(command, working_dir=tmp_path, mode=mode, **kwargs)

    def sandbox_of(result: CommandResult) -> str:
        return result.details.get("sandbox_id") or result.details.get("session") or ""

    try:
        run("true")
        first = run("echo kept > /tmp/marker; uname -r")
        assert first.stdout == f"{GVISOR_RELEASE}\n", "a bomb is only ever aimed at gVisor"
        bomb = run(GVISOR_GUARD + BACKGROUND_BOMB, timeout=60)
        assert "NOT-GVISOR" not in bomb.stdout
        assert not bomb.timed_out and bomb.error is None and "done" in bomb.stdout, bomb
        after = run("cat /tmp/marker 2>/dev/null || echo emptied; ls /proc | grep -c '^[0-9]'")
        assert sandbox_of(after) == sandbox_of(first) != "", (first.details, after.details)
        assert "session_note" not in after.details, after.details
        marker, count = after.stdout.split()
        assert marker == ("kept" if session is not None else "emptied"), after.stdout
        assert int(count) <= 4, after.stdout  # the agent, sh, ls and grep
    finally:
        if session is not None:
            session.close()
        POOL.reset()
