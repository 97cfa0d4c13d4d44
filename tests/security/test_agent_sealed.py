"""A warm session's agent is out of its commands' reach (``session_agent.seal``).

A command runs as the caller, next to the agent that reports its end to the host. If it
could write into the agent's channel it could forge its own end and keep running inside
the sandbox while later commands run next to it; if it could ptrace, signal or rewrite
the agent, it could forge later commands' results too. Each test judges from the host:
the result the session returns, and whether the same sandbox carries on.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from gvisor_magic import IsolatedSession

#: A complete "command ended with 0" frame, as the agent would send it.
FORGED_END = b'X\x00\x00\x00\x0b{"exit": 0}'

HOSTILE = textwrap.dedent(r'''
    import ctypes, errno, json, os, signal, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    FORGED = %r
    me = os.getpid()
    report = {"fd_opened": [], "fd_refused": {}, "mem": [], "ptrace": [], "kill": [],
              "environ_of_agent": None, "caps": None, "pid1_uid": None, "pids": []}
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    report["pids"] = pids
    for pid in pids:
        if pid == me:
            continue
        try:
            names = os.listdir("/proc/%%d/fd" %% pid)
        except OSError:
            names = []
        for name in names:
            path = "/proc/%%d/fd/%%s" %% (pid, name)
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            for flags in (os.O_WRONLY | os.O_NONBLOCK, os.O_RDWR | os.O_NONBLOCK):
                try:
                    fd = os.open(path, flags)
                except OSError as exc:
                    report["fd_refused"][path] = errno.errorcode.get(exc.errno, exc.errno)
                    continue
                try:
                    os.write(fd, FORGED * 4)
                except OSError:
                    pass
                os.close(fd)
                report["fd_opened"].append([pid, int(name), target])
        for what in ("mem",):
            try:
                with open("/proc/%%d/%%s" %% (pid, what), "r+b") as handle:
                    handle.seek(0x400000)
                    handle.write(b"\xcc")
                report["mem"].append(pid)
            except OSError:
                pass
        if libc.ptrace(16, pid, 0, 0) == 0:  # PTRACE_ATTACH
            report["ptrace"].append(pid)
            libc.ptrace(17, pid, 0, 0)
    for sig in (signal.SIGSTOP, signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                signal.SIGUSR1, signal.SIGKILL):
        try:
            os.kill(1, sig)
            report["kill"].append(sig.name)
        except OSError:
            pass
    try:
        with open("/proc/1/environ", "rb") as handle:
            report["environ_of_agent"] = handle.read().replace(b"\0", b"").decode(
                errors="replace")
    except OSError as exc:
        report["environ_of_agent"] = errno.errorcode.get(exc.errno, exc.errno)
    with open("/proc/self/status") as status:
        report["caps"] = sorted(line.split()[0] for line in status
                                if line.startswith("Cap") and int(line.split()[1], 16))
    with open("/proc/1/status") as status:
        report["pid1_uid"] = [line.split()[1:] for line in status if line.startswith("Uid")][0]
    # A straggler that keeps forging ends: were it left running, it would end later
    # commands early with exit 0.
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                for name in os.listdir("/proc/1/fd"):
                    try:
                        fd = os.open("/proc/1/fd/" + name, os.O_WRONLY | os.O_NONBLOCK)
                        os.write(fd, FORGED)
                        os.close(fd)
                    except OSError:
                        pass
                time.sleep(0.05)
        os._exit(0)
    time.sleep(1)  # a forged end would have ended the command by now
    with open("report.json", "w") as handle:
        json.dump(report, handle)
    print("the real end")
    sys.exit(7)
''') % FORGED_END


@pytest.fixture(params=["runsc", "docker"])
def session(request, tmp_path):
    request.getfixturevalue(f"{request.param}_works")
    with IsolatedSession(tmp_path, mode=request.param) as warm:
        yield warm


def test_a_hostile_command_cannot_reach_the_agent(session, tmp_path):
    (tmp_path / "hostile.py").write_text(HOSTILE)
    first = session.run("echo kept > /tmp/marker")
    sandbox = first.details.get("sandbox_id") or first.details.get("container_id")
    result = session.run(["python3", "hostile.py"], timeout=60)
    # The host got the command's real end, after all its output: nothing forged an end.
    # (Forged frames written into this command's own output pipes are just its output.)
    assert result.returncode == 7, (result.returncode, result.stdout, result.stderr,
                                    result.error)
    assert "the real end\n" in result.stdout, result.stdout[-500:]
    report = json.loads((tmp_path / "report.json").read_text())
    # No fd of the agent (PID 1) opened but the pipes of this very command.
    agent_fds = [entry for entry in report["fd_opened"] if entry[0] == 1]
    assert all(entry[2].startswith("pipe:") for entry in agent_fds), agent_fds
    refused_sockets = [path for path, why in report["fd_refused"].items()
                       if path.startswith("/proc/1/fd/") and why == "ENXIO"]
    assert len(refused_sockets) >= 3, report["fd_refused"]  # the channel and stderr
    assert report["mem"] == [] and report["ptrace"] == [], report
    assert report["kill"] == [], report  # SIGKILL and SIGSTOP included
    assert report["caps"] == [], report  # no capability in any set, bounding included
    # gVisor lets a command read the agent's environment (/proc/1/environ): it is zeroed.
    assert report["environ_of_agent"] in ("", "EACCES", "EPERM"), report
    # PID 1 is the agent, under a uid of its own (real, effective, saved, filesystem):
    # effective and filesystem uid the caller's, so files it makes are the caller's.
    assert report["pid1_uid"][0] == report["pid1_uid"][2] != report["pid1_uid"][1], report
    # The same sandbox carries on, exact, with nothing of the hostile command left.
    after = session.run("cat /tmp/marker; ls /proc | grep -c '^[0-9]'; exit 3")
    assert after.returncode == 3 and "session_note" not in after.details, after
    assert after.stdout.split()[0] == "kept"
    assert (after.details.get("sandbox_id") or after.details.get("container_id")) == sandbox
    # The agent, this shell, and `ls` and `grep` of the pipeline: the straggler is gone.
    assert int(after.stdout.split()[1]) <= 4, after.stdout


def test_docker_relay_is_invisible_to_commands(docker_works, tmp_path):
    """Docker's stdio are pipes, which a same-uid command could open again; the relay that
    holds them lives in a PID namespace no command can see into."""
    with IsolatedSession(tmp_path, mode="docker") as warm:
        result = warm.run("for p in /proc/[0-9]*; do echo ${p#/proc/} $(head -c 200 $p/cmdline "
                          "| tr '\\0' ' ' | cut -c1-60); done")
    assert result.returncode == 0, result
    # The relay is a fork of the agent (the same command line): only one is visible, PID 1.
    agents = [line.split()[0] for line in result.stdout.splitlines() if " -I -S -c " in line]
    assert agents == ["1"], result.stdout
