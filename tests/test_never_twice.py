"""A command runs once, on one backend, and never outlives its caller by more than a bound.

- Noise on runsc's stderr before the start marker (a wrapper that logs, runsc's own debug
  log on stderr) once made the runner believe the sandbox never started, and the command ran
  again elsewhere. The start is now proven by a file the init writes, not by a shared stream.
- A sandbox that fails to start for one command while gVisor works here is that command's
  error: never a reason to run it on another backend, never a mark against later commands.
- A caller killed with SIGKILL leaves nothing running past the command's timeout (plus a
  short grace), and its scratch directories are reclaimed by the next run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from gvisor_magic import run_command_isolated
from gvisor_magic.backends.init import DEADLINE_GRACE
from gvisor_magic.runner import REGISTRY

RUNSC = shutil.which("runsc") or "/usr/bin/runsc"
RECORD = 'echo "ran in kernel $(uname -r)" >> runs.log'


def _wrapper(tmp_path: Path, body: str) -> str:
    path = tmp_path / "runsc-wrapper"
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body).replace("RUNSC", RUNSC))
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("noise", ["wrapper", "debug-log"])
def test_noise_before_the_start_marker_never_runs_a_command_twice(noise, tmp_path,
                                                                  monkeypatch, runsc_works):
    # Docker out of the way, so that auto's next choice after runsc is the host itself.
    monkeypatch.setenv("GVISOR_MAGIC_DOCKER_RUNTIME", "no-such-runtime")
    if noise == "wrapper":
        monkeypatch.setenv("GVISOR_MAGIC_RUNSC", _wrapper(tmp_path, """\
            echo "wrapper: about to run runsc $1" >&2
            exec RUNSC "$@"
            """))
    else:
        monkeypatch.setenv("GVISOR_MAGIC_RUNSC_FLAGS", "--debug --debug-log=/dev/stderr")
    REGISTRY.forget()
    work = tmp_path / "work"
    work.mkdir()
    result = run_command_isolated(RECORD, working_dir=work, timeout=60)  # auto: runsc first
    runs = (work / "runs.log").read_text().splitlines()
    assert runs == ["ran in kernel 4.4.0"], runs
    assert result.backend == "runsc" and result.isolated and result.success, result.describe()
    assert result.fallback_reason is None, result.fallback_reason


def test_a_sandbox_that_fails_for_one_command_is_that_commands_error(tmp_path, monkeypatch,
                                                                     runsc_works):
    """runsc works here (its probe passes); one command's sandbox cannot start. The command
    does not run anywhere (auto mode would once have tried the host), the result says why,
    and the next command runs under gVisor as usual."""
    monkeypatch.setenv("GVISOR_MAGIC_DOCKER_RUNTIME", "no-such-runtime")
    monkeypatch.setenv("GVISOR_MAGIC_RUNSC", _wrapper(tmp_path, """\
        prev=""
        for arg in "$@"; do
            if [ "$prev" = "--bundle" ] && grep -q FAIL-THIS-ONE "$arg/config.json"; then
                echo "simulated: this sandbox cannot start" >&2; exit 1
            fi
            prev=$arg
        done
        exec RUNSC "$@"
        """))
    REGISTRY.forget()
    work = tmp_path / "work"
    work.mkdir()
    failed = run_command_isolated(f"echo FAIL-THIS-ONE; {RECORD}", working_dir=work, timeout=60)
    assert not (work / "runs.log").exists(), "the command must not run on another backend"
    assert failed.backend == "runsc" and failed.returncode == 125 and not failed.success
    assert "did not run" in failed.error and "simulated" in failed.error, failed.error
    after = run_command_isolated(RECORD, working_dir=work, timeout=60)
    assert after.backend == "runsc" and after.isolated and after.fallback_reason is None
    assert (work / "runs.log").read_text() == "ran in kernel 4.4.0\n"


CALLER = """
import sys
from gvisor_magic import run_command_isolated
print("calling", flush=True)
run_command_isolated("(setsid sleep 119.7 &); sleep 119.7", mode=sys.argv[1], timeout=2)
"""


def _ours(tmp: str) -> list[str]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            line = " ".join(process.info["cmdline"] or [])
        except psutil.Error:
            continue
        if tmp in line:
            found.append(f"{process.pid}: {line[:160]}")
    return found


def _containers(pid: int) -> list[str]:
    try:
        import docker

        client = docker.from_env(timeout=10)
        try:
            return [c.short_id for c in client.containers.list(
                all=True, filters={"label": f"io.github.gvisor-magic.owner-pid={pid}"})]
        finally:
            client.close()
    except Exception:
        return []


def _tagged_sleeps() -> list[int]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, TypeError):
            if process.info["cmdline"][:2] == ["sleep", "119.7"]:
                found.append(process.pid)
    return found


@pytest.mark.parametrize("mode", ["runsc", "docker", "subprocess"])
def test_a_sandbox_never_outlives_a_killed_caller(mode, request):
    """SIGKILL the caller mid-command (a kernel killed during a --fresh cell): nothing keeps
    running past the timeout and a short grace, not even a process that left its session
    on the unisolated fallback, and the next run reclaims the dead caller's directories."""
    if mode != "subprocess":
        request.getfixturevalue(f"{mode}_works")
    tmp = tempfile.mkdtemp(prefix="gvm-caller-")
    env = {**os.environ, "TMPDIR": tmp}
    caller = subprocess.Popen([sys.executable, "-c", CALLER, mode], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert caller.stdout.readline() == b"calling\n"
        time.sleep(1.5)  # the sandbox is up and its command sleeps
        caller.send_signal(signal.SIGKILL)
        caller.wait(timeout=10)
        deadline = time.monotonic() + 2 + DEADLINE_GRACE + 15
        while time.monotonic() < deadline and (_ours(tmp) or _containers(caller.pid)
                                               or _tagged_sleeps()):
            time.sleep(0.5)
        assert not _ours(tmp), _ours(tmp)
        assert not _tagged_sleeps(), "the command outlived its caller and its timeout"
        assert not _containers(caller.pid)
        # The next run of the same user reclaims what the dead caller left on disk.
        subprocess.run([sys.executable, "-c", "from gvisor_magic import run_command_isolated;"
                        f"run_command_isolated('true', mode={mode!r})"], env=env, check=True,
                       timeout=120)
        left = [name for name in os.listdir(tmp) if str(caller.pid) in name]
        assert not left, left
    finally:
        if caller.poll() is None:
            caller.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_stalled_warm_sandbox_never_runs_the_command_it_gave_up_on(tmp_path, monkeypatch,
                                                                     runsc_works):
    """The host stops waiting for a stalled agent, replaces the sandbox and runs the command
    there. The stalled one wakes up just after (SIGSTOP/SIGCONT stand in for the stall) and
    has the request in its pipe, yet never runs it: it starts only on the host's "go"."""
    import threading

    from gvisor_magic import IsolatedSession, agent_channel
    from gvisor_magic.backends.transports import RunscTransport

    monkeypatch.setattr(agent_channel, "ACCEPT_TIMEOUT", 2.0)
    # A slow kill (a busy host, a slow runsc) widens the window in which the woken agent
    # could run what it had accepted; the fence must hold through it.
    close = RunscTransport.close

    def slow_close(self) -> None:
        time.sleep(1.5)
        close(self)

    monkeypatch.setattr(RunscTransport, "close", slow_close)
    work = tmp_path / "work"
    work.mkdir()
    with IsolatedSession(work, mode="runsc") as session:
        session.run("true")
        stalled = [p for p in psutil.process_iter(["cmdline"])
                   if session.sandbox_id in " ".join(p.info["cmdline"] or [])
                   and "boot" in (p.info["cmdline"] or [])]
        assert stalled, "the sandbox's own process (runsc boot) was not found"
        for process in stalled:
            process.send_signal(signal.SIGSTOP)

        def wake() -> None:
            time.sleep(2.3)  # just after the host gave up, before it kills the sandbox
            for process in stalled:
                with contextlib.suppress(psutil.Error):
                    process.send_signal(signal.SIGCONT)

        threading.Thread(target=wake, daemon=True).start()
        result = session.run(RECORD, timeout=60)
        time.sleep(2.0)  # time for the woken agent to do what it would do
        assert (work / "runs.log").read_text().splitlines() == ["ran in kernel 4.4.0"]
        assert (result.success and "replaced" in result.details.get("session_note", "")) or \
            result.success, result.describe()


def test_the_unisolated_fallback_loses_no_descendant(tmp_path):
    """On the host, a child that called setsid, or was re-parented when its parent exited,
    is still killed when the command ends or times out (docs/sandbox.md: "killed as a whole, plus
    any descendant that left it")."""
    ended = run_command_isolated("(setsid sleep 119.7 &); setsid sleep 119.7 & echo done",
                                 mode="subprocess", working_dir=tmp_path, timeout=30)
    assert ended.stdout == "done\n" and not ended.isolated
    timed = run_command_isolated("(setsid sleep 119.7 &); sleep 119.7", mode="subprocess",
                                 working_dir=tmp_path, timeout=2)
    assert timed.timed_out
    deadline = time.monotonic() + 5
    while _tagged_sleeps() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _tagged_sleeps()
    assert run_command_isolated("kill -9 $$", mode="subprocess").returncode == -9
