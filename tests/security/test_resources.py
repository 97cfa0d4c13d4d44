"""Resources: bombs, floods and spins are bounded, reported, and the caller survives.

Bombs are only ever aimed at a sandbox that first proved, in the same script,
that it runs on gVisor's kernel (``Probe.run_in_gvisor``). The subprocess
backend's own rlimits are tested with a fork bomb run by an ordinary user in
test_host_limits.py.
"""

from __future__ import annotations

import os

import psutil
import pytest

from gvisor_magic import IsolatedSession, Limits, run_command_isolated

MiB = 2**20
ON_HOST = "resource bombs are aimed only at a sandbox proven to be gVisor " \
          "(test_host_limits.py checks the subprocess backend's rlimits as an ordinary user)"


def test_fork_bomb(probe):
    probe.harmless_only(["fork bomb"], ON_HOST)
    result = probe.run_in_gvisor("bomb() { bomb | bomb & }; bomb; sleep 600", timeout=3)
    evidence = f"{result.describe()}; max_processes {(probe.limits or Limits()).max_processes}"
    bounded = result.timed_out or not result.success
    if probe.flavour == "session":
        left = probe.run("ps -e -o comm= | wc -l").stdout.strip()
        evidence += f"; processes left in the session: {left}"
        bounded = bounded and int(left) < 5
    probe.verdict("fork bomb", not bounded, evidence)


MEMORY_BOMB = r'''
import json
held, size = [], 64 << 20
try:
    while True:
        held.append(b"x" * size)
except MemoryError:
    pass
total = len(held) * size
held.clear()
print(json.dumps({"bytes": total}))
'''


@pytest.mark.limits(max_address_space=512 * MiB)
def test_memory_bomb(probe):
    probe.harmless_only(["memory bomb"], ON_HOST)
    me = psutil.Process()
    before = me.memory_info().rss
    _result, found = probe.run_python(MEMORY_BOMB, timeout=60, gvisor_only=True)
    grown = me.memory_info().rss - before
    probe.verdict("memory bomb", found["bytes"] > 512 * MiB,
                  f"MemoryError after {found['bytes'] // MiB} MiB (max_address_space 512 MiB)")
    assert grown < 200 * MiB, "the caller's memory must stay bounded"


def test_cpu_spin_past_the_timeout(probe):
    probe.harmless_only(["CPU spin past the timeout"], ON_HOST)
    result = probe.run_in_gvisor("while :; do :; done", timeout=2)
    probe.verdict("CPU spin past the timeout", not result.timed_out, result.describe())
    assert result.returncode == 124


def test_output_flood(probe):
    probe.harmless_only(["output flood"], ON_HOST)
    me = psutil.Process()
    before = me.memory_info().rss
    streamed = [0]

    def count(stream: str, text: str) -> None:
        streamed[0] += len(text)

    result = probe.run_in_gvisor("cat /dev/zero", timeout=3, on_output=count)
    grown = me.memory_info().rss - before
    kept = len(result.stdout)
    probe.verdict("output flood", kept > probe.max_output or not result.truncated,
                  f"{streamed[0] // MiB} MiB streamed, {kept // MiB} MiB kept (truncated), "
                  f"caller grew {grown // MiB} MiB, ended after {result.duration:.0f} s "
                  "(timeout 3 s)")
    assert result.timed_out and result.truncated
    assert result.error is None, "the sandbox must stop cleanly at the timeout"
    assert grown < 200 * MiB


@pytest.mark.parametrize("session", [False, True], ids=["one-shot", "session"])
def test_docker_keeps_no_log_of_the_output(docker_works, tmp_path, session):
    """Docker's default json-file log would copy a flood onto the host's disk."""
    import docker

    client = docker.from_env()
    seen: list[str] = []

    def look(stream: str, text: str) -> None:
        if not seen:
            for container in client.containers.list(
                    filters={"label": f"io.github.gvisor-magic.owner-pid={os.getpid()}"}):
                seen.append(container.attrs["HostConfig"]["LogConfig"]["Type"])

    try:
        if session:
            with IsolatedSession(tmp_path, mode="docker") as warm:
                warm.run("echo flood", on_output=look)
        else:
            run_command_isolated("echo flood", mode="docker", on_output=look)
    finally:
        client.close()
    assert seen and set(seen) == {"none"}, seen


FD_BOMB = r'''
import json
held = []
try:
    while True:
        held.append(open("/dev/null"))
except OSError as exc:
    print(json.dumps({"open": len(held), "error": type(exc).__name__}))
'''


def test_fd_exhaustion(probe):
    probe.harmless_only(["fd exhaustion"], ON_HOST)
    me = psutil.Process()
    probe.run("true")  # a session's own connection is opened by its first command
    fds = me.num_fds()
    _result, found = probe.run_python(FD_BOMB, gvisor_only=True)
    probe.verdict("fd exhaustion", found["open"] > 4096,
                  f"{found['error']} after {found['open']} open files (max_open_files 4096)")
    assert me.num_fds() <= fds + 8
