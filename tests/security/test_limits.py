"""Limits: configurable through the API, the CLI, ``%config`` and ``%%isolated --limit``,
enforced inside the sandbox, and shown by the widget and ``doctor``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from IPython.core.error import UsageError
from support.ipython_shell import magics, run

import gvisor_magic
from gvisor_magic import InvalidRequestError, Limits, registry, run_command_isolated
from gvisor_magic.request import GiB, MiB

CLI = [sys.executable, "-m", "gvisor_magic.cli"]


def test_limits_parse_sizes_none_and_refuse_nonsense():
    limits = Limits.parse({"memory": "2G", "max_processes": "64", "tmp_size": "64M",
                           "cpus": "1.5", "max_address_space": "none"})
    assert limits == Limits(memory=2 * GiB, max_processes=64, tmp_size=64 * MiB, cpus=1.5,
                            max_address_space=None)
    assert Limits.parse({}, limits) == limits
    for bad in ({"memroy": "1G"}, {"memory": "lots"}, {"memory": "-1"}, {"tmp_size": "none"},
                {"cpus": "many"}):
        with pytest.raises(InvalidRequestError):
            Limits.parse(bad)
    # What enforces memory is said per backend, and never claimed where nothing does.
    def on(name: str, limits: Limits | None = None) -> str:
        return (limits or Limits()).describe(registry.enforcement((name,)))

    assert "memory 4 GiB (container cgroup)" in on("docker")
    assert "memory 4 GiB (NOT enforced on the host)" in on("subprocess")
    assert re.search(r"memory 4 GiB \((host cgroup|watchdog)\)", on("runsc"))
    assert "cpus 1 (NOT enforced on runsc)" in on("runsc", Limits(cpus=1))


MEMORY_BOMB = ("import os, sys\n"
               "if os.uname().release != '4.4.0': print('NOT-GVISOR'); sys.exit(99)\n"
               "print('inside', flush=True)\n"
               "held = [bytearray(1 << 20) for _ in range(3000)]\n"
               "print('allocated 3000 MiB', flush=True)\n")


@pytest.mark.parametrize("guard", ["host cgroup", "watchdog", "container cgroup"])
@pytest.mark.parametrize("flavour", ["one-shot", "session"])
def test_memory_limit_holds_for_the_whole_sandbox(guard, flavour, monkeypatch, request):
    """A command that allocates 3000 MiB under a 256 MiB limit never gets it: the host cgroup
    (or, without one, the watchdog) ends it with 137 and says "memory limit"; a warm session
    goes on (or is replaced, and says so)."""
    from gvisor_magic import IsolatedSession
    from gvisor_magic.memory import mechanism

    mode = "docker" if guard == "container cgroup" else "runsc"
    request.getfixturevalue(f"{mode}_works")
    monkeypatch.setenv("GVISOR_MAGIC_MEMORY_GUARD", "watchdog" if guard == "watchdog" else "auto")
    if mode == "runsc" and mechanism() != guard:
        pytest.skip(f"no writable memory cgroup for this process: {mechanism()} is used instead")
    # Docker's rlimits would stop the bomb first (MemoryError): leave it to the cgroup.
    limits = Limits(memory=256 * MiB, max_address_space=None)
    argv = [sys.executable, "-I", "-c", MEMORY_BOMB]
    if flavour == "session":
        with IsolatedSession(mode=mode, limits=limits) as session:
            result = session.run(argv, timeout=120)
            after = session.run("echo still-works")
        assert after.stdout == "still-works\n", after.describe()
        if after.details.get("session") != result.details.get("session"):
            assert "memory limit" in after.details.get("session_note", ""), after.details
    else:
        result = run_command_isolated(argv, mode=mode, limits=limits, timeout=120)
    assert "NOT-GVISOR" not in result.stdout
    assert "inside" in result.stdout, result.describe()
    assert "allocated" not in result.stdout, result.describe()
    assert result.returncode == 137 and not result.success, result.describe()
    assert "memory limit" in (result.error or "") and guard in result.error, result.describe()


@pytest.mark.parametrize("mode", ["runsc", "docker"])
def test_api_limits_hold_inside_the_sandbox(mode, request):
    request.getfixturevalue(f"{mode}_works")
    limits = Limits(max_open_files=123, max_file_size=MiB, tmp_size=8 * MiB)
    result = run_command_isolated(
        "uname -r; ulimit -n; ulimit -f; df -k /tmp | tail -1; "
        "head -c 2M /dev/zero > big; echo rc=$?", mode=mode, limits=limits)
    lines = result.stdout.split("\n")
    assert lines[:3] == ["4.4.0", "123", "2048"], result.stdout  # dash: 512-byte blocks
    assert lines[3].split()[1] == str(8 * 1024)
    assert "rc=0" not in result.stdout


def test_cli_run_takes_limits_and_doctor_shows_them(runsc_works):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GVISOR_MAGIC_")}
    done = subprocess.run([*CLI, "run", "--mode", "runsc", "--limit", "max_open_files=77",
                           "--shell", "--", "ulimit -n"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0 and done.stdout == "77\n", done.stderr
    bad = subprocess.run([*CLI, "run", "--limit", "memory=lots", "--", "true"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "limits.memory" in bad.stderr
    doctor = subprocess.run([*CLI, "doctor"], capture_output=True, text=True, timeout=120,
                            env=env)
    assert "default limits: processes 512" in doctor.stdout
    assert "runsc: processes, open files" in doctor.stdout
    data = json.loads(subprocess.run([*CLI, "doctor", "--json"], capture_output=True,
                                     text=True, timeout=120, env=env).stdout)
    assert data["limits"]["max_processes"] == 512 and "docker" in data["limits"]["enforcement"]


def test_config_and_cell_limits_reach_the_sandbox_and_the_widget(ip, capfd, runsc_works):
    settings = magics(ip).settings
    run(ip, "%config Isolation.limits = {'max_open_files': 222}")
    assert settings.effective_limits().max_open_files == 222
    widget = gvisor_magic.status_widget()
    run(ip, "%%isolated --quiet\nulimit -n\n")
    assert capfd.readouterr().out == "222\n"
    assert ">default limits</td><td>processes 512, open files 222," in widget.value
    run(ip, "%%isolated --quiet --limit max_open_files=99 --limit tmp_size=16M\n"
            "ulimit -n; df -k /tmp | tail -1\n")
    out = capfd.readouterr().out.split("\n")
    assert out[0] == "99" and out[1].split()[1] == str(16 * 1024)
    # The panel shows the kernel's defaults (and what enforces them), not one cell's own.
    assert "open files 222," in widget.value and "/tmp and HOME 512 MiB" in widget.value
    run(ip, "%config Isolation.limits = {'memory': 'lots'}")
    assert settings.limits == {"max_open_files": 222}
    with pytest.raises(UsageError, match="unknown limit 'memroy'"):
        run(ip, "%%isolated --limit memroy=1G\ntrue\n")
