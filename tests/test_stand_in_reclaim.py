"""Stand-ins left by a caller killed with SIGKILL are reclaimed by the next run of the same
user, whatever that run needs; the sandbox that still used them is ended first. Checked on
the host: which paths exist in the home afterwards, which processes still run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

from gvisor_magic import run_command_isolated

#: A caller whose sandboxed command needs stand-ins (its working dir is a home missing
#: .ipython, .ssh, .gitconfig...) and runs until it is killed.
CALLER = """
import sys
from gvisor_magic import run_command_isolated

def show(stream, text):
    sys.stdout.write(text)
    sys.stdout.flush()

run_command_isolated("echo gvm-started; exec sleep 600", working_dir=sys.argv[1],
                     mode=sys.argv[2], reuse=False, timeout=900, on_output=show)
"""
#: Missing protected paths of a home that get a stand-in (``protected.STAND_INS``).
EXPECTED = (".ipython", ".ssh", ".gitconfig", ".jupyter", ".local/bin")


def _sandboxes_of(pid: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(f"gvisor-magic-{pid}-" in part for part in process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            continue
    return found


def _home_and_plain(tmp_path) -> tuple[Path, Path]:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("# a home\n")  # what makes the working dir a home
    plain = tmp_path / "plain"  # not a home: a run here needs no stand-in
    plain.mkdir()
    return home, plain


def _kill_a_caller_mid_run(home: Path, mode: str) -> int:
    """Start a caller whose command (in ``home``) needs stand-ins, SIGKILL it once the command
    runs; return its pid."""
    caller = subprocess.Popen([sys.executable, "-c", CALLER, str(home), mode],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        seen = b""
        while b"gvm-started" not in seen:  # the sandbox runs: its stand-ins are in place
            chunk = caller.stdout.read1(4096)
            assert chunk, f"the caller ended before its command started: {seen!r}"
            seen += chunk
        made = [rel for rel in EXPECTED if (home / rel).exists()]
        assert made == list(EXPECTED), made
        caller.kill()
        caller.wait(timeout=30)
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait(timeout=30)
        caller.stdout.close()
    return caller.pid


def test_a_killed_caller_s_stand_ins_go_at_the_next_plain_run(runsc_works, tmp_path):
    home, plain = _home_and_plain(tmp_path)
    pid = _kill_a_caller_mid_run(home, "runsc")
    # Its sandbox outlives it (runsc runs in a session of its own), and so do its stand-ins.
    orphans = _sandboxes_of(pid)
    assert orphans, "expected the killed caller's sandbox to be still running"
    assert all((home / rel).exists() for rel in EXPECTED)

    result = run_command_isolated("echo plain", working_dir=plain, mode="runsc", reuse=False)
    assert result.success and result.stdout == "plain\n", result
    assert not any(p.exists() for p in (home / rel for rel in EXPECTED)), sorted(
        str(p.relative_to(home)) for p in home.rglob("*"))
    assert sorted(os.listdir(home)) == [".bashrc"], os.listdir(home)
    _, alive = psutil.wait_procs(orphans, timeout=30)
    assert not alive, f"the killed caller's sandbox still runs: {alive}"


def _containers_of(pid: int) -> list[str]:
    return subprocess.run(["docker", "ps", "-aq", "--filter",
                           f"label=io.github.gvisor-magic.owner-pid={pid}"],
                          capture_output=True, text=True, timeout=60, check=True).stdout.split()


def test_a_killed_caller_s_docker_container_keeps_its_stand_ins_until_it_ends(docker_works,
                                                                              tmp_path):
    """A container outlives its killed caller, and is not killed by another run (it may be
    another pid namespace's): its stand-ins stay until it has ended, then the next run
    removes them."""
    home, plain = _home_and_plain(tmp_path)
    pid = _kill_a_caller_mid_run(home, "docker")
    try:
        assert _containers_of(pid), "expected the killed caller's container to be running"
        result = run_command_isolated("echo plain", working_dir=plain, mode="runsc",
                                      reuse=False)
        assert result.success, result
        assert _containers_of(pid), "another run killed a container it cannot know the owner of"
        assert all((home / rel).exists() for rel in EXPECTED), "removed under a running sandbox"
    finally:
        containers = _containers_of(pid)
        if containers:
            subprocess.run(["docker", "rm", "-f", *containers], capture_output=True, timeout=120,
                           check=True)
    result = run_command_isolated("echo plain", working_dir=plain, mode="runsc", reuse=False)
    assert result.success, result
    assert sorted(os.listdir(home)) == [".bashrc"], os.listdir(home)
