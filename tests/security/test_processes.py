"""Processes: escaping the timeout, outliving the command, reaching host processes."""

from __future__ import annotations

import json
import sys

from conftest import PYTHON_GUARD

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
