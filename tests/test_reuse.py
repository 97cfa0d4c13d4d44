"""One-shot calls that repeat a sandbox spec reuse a warm sandbox: each call still finds no
file, process or environment of the one before it, runs once, and nothing outlives the
pool's idle timeout or its caller. Checked from the host and from the next call."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pytest

from gvisor_magic import InvalidRequestError, Limits, run_command_isolated
from gvisor_magic.backends.layout import python_prefixes
from gvisor_magic.warm import POOL


def _sandbox_pids(sandbox_id: str) -> list[int]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(sandbox_id in part for part in process.info["cmdline"] or []):
                found.append(process.pid)
        except psutil.Error:
            continue
    return found


def _wait_gone(sandbox_id: str, seconds: float = 20) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := _sandbox_pids(sandbox_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.fixture(params=["runsc", "docker"])
def mode(request):
    request.getfixturevalue(f"{request.param}_works")
    return request.param


def _warm(work, mode, **kwargs):
    """Two calls: the first runs fresh, the second runs in the warm sandbox the first left
    booting ahead of need."""
    first = run_command_isolated("true", working_dir=work, mode=mode, **kwargs)
    assert first.success and "reused" not in first.details, first
    second = run_command_isolated("uname -r", working_dir=work, mode=mode, **kwargs)
    assert second.stdout == "4.4.0\n" and second.isolated and second.backend == mode
    assert "reused" in second.details, second.details
    return second.details["sandbox_id"]


def test_a_repeated_call_runs_in_a_warm_sandbox_in_gvisor(mode, tmp_path):
    sandbox = _warm(tmp_path, mode)
    third = run_command_isolated("uname -r; pwd", working_dir=tmp_path, mode=mode)
    assert third.stdout == f"4.4.0\n{tmp_path}\n" and third.details["sandbox_id"] == sandbox
    assert third.fallback_reason is None and third.isolated
    assert _sandbox_pids(sandbox), "the warm sandbox is kept for the next call"
    POOL.reset()
    assert not _wait_gone(sandbox)


def test_each_call_finds_no_file_process_or_environment_of_the_last(mode, tmp_path):
    sandbox = _warm(tmp_path, mode)
    planted = run_command_isolated(
        "echo s3cret > /tmp/left; echo s3cret > ~/left; mkdir -p /tmp/d/e ~/d; "
        "echo x > /tmp/d/e/f; chmod 000 /tmp/d/e /tmp/d ~/d; ln -s /tmp/left ~/link; "
        "mkfifo /tmp/fifo; (setsid sleep 300 &); (nohup sleep 301 >/dev/null 2>&1 &); "
        "echo kept > kept.txt; echo $TOKEN",
        working_dir=tmp_path, mode=mode, env={"TOKEN": "tok-s3cret"})
    assert planted.success and planted.stdout == "tok-s3cret\n", planted
    assert planted.details["sandbox_id"] == sandbox
    after = run_command_isolated(
        "echo TMP; ls -A /tmp; echo HOME; ls -A ~; echo PROCS; cat /proc/[0-9]*/comm; "
        "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c s3cret; "
        "echo TOKEN=${TOKEN:-unset}; cat kept.txt",
        working_dir=tmp_path, mode=mode)
    assert after.details["sandbox_id"] == sandbox, "the same sandbox served both calls"
    out = after.stdout
    tmp, home = out.split("TMP\n")[1].split("HOME\n")
    home = home.split("PROCS\n")[0]
    for name in ("left", "d", "fifo", "link"):
        assert name not in tmp.split() and name not in home.split(), (tmp, home)
    assert "sleep" not in out.split("PROCS\n")[1].split(), "a process of the last call survived"
    assert "TOKEN=unset" in out and "\n0\n" in out, "the last call's environment is readable"
    assert out.endswith("kept\n"), "the working dir is the caller's and keeps its files"
    assert (tmp_path / "kept.txt").read_text() == "kept\n"
    # /tmp holds only what the runtime made to mount host dirs below it (the working dir,
    # and this Python's prefix when it lives in /tmp).
    mounted = [tmp_path.as_posix(), *python_prefixes()]
    assert all(any(m.startswith(f"/tmp/{name}/") for m in mounted) for name in tmp.split()), (
        tmp, mounted)


def test_a_working_dir_below_the_private_dirs_keeps_its_files(runsc_works):
    """The working dir (a host directory) is bound below /tmp or HOME inside: emptying them
    between calls never enters it, however deep it is."""
    home = os.path.expanduser("~")
    for parent in (tempfile.gettempdir(), home):
        work = tempfile.mkdtemp(prefix="gvm-reuse-", dir=parent)
        try:
            os.makedirs(os.path.join(work, "deep", "er"))
            for name in ("a.txt", "deep/b.txt", "deep/er/c.txt"):
                with open(os.path.join(work, name), "w") as handle:
                    handle.write("host\n")
            os.symlink("a.txt", os.path.join(work, "link"))
            for _ in range(4):
                result = run_command_isolated("cat a.txt deep/b.txt deep/er/c.txt",
                                              working_dir=work, mode="runsc")
                assert result.stdout == "host\n" * 3, result
            assert "reused" in result.details
            assert sorted(os.listdir(work)) == ["a.txt", "deep", "link"]
            with open(os.path.join(work, "deep/er/c.txt")) as handle:
                assert handle.read() == "host\n"
        finally:
            POOL.reset()
            subprocess.run(["rm", "-rf", work], check=True)


def test_a_call_in_a_sandbox_that_died_runs_once_elsewhere(mode, tmp_path):
    sandbox = _warm(tmp_path, mode)
    for pid in _sandbox_pids(sandbox):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not _wait_gone(sandbox)
    log = tmp_path / "runs.log"
    result = run_command_isolated(f"echo ran >> {log}; uname -r", working_dir=tmp_path,
                                  mode=mode)
    assert result.stdout == "4.4.0\n" and result.success, result
    assert result.details.get("sandbox_id") != sandbox
    assert log.read_text() == "ran\n", "the command ran more than once"


def test_timeouts_kill_the_command_and_the_next_call_is_clean(runsc_works, tmp_path):
    _warm(tmp_path, "runsc")
    timed = run_command_isolated("sleep 30 & sleep 31", working_dir=tmp_path, mode="runsc",
                                 timeout=1)
    assert timed.timed_out and not timed.success and "reused" in timed.details
    after = run_command_isolated("cat /proc/[0-9]*/comm", working_dir=tmp_path, mode="runsc")
    assert "sleep" not in after.stdout.split() and "reused" in after.details


def test_idle_sandboxes_stop_after_the_idle_timeout(runsc_works, tmp_path, monkeypatch):
    monkeypatch.setattr(POOL, "idle_timeout", 1.5)
    sandbox = _warm(tmp_path, "runsc")
    assert POOL.live() == 1
    assert not _wait_gone(sandbox, 15), "an idle sandbox outlived the idle timeout"
    assert POOL.live() == 0
    # After a pause longer than the timeout, a call runs fresh again; the sandbox it leaves
    # ready for the next call stops after the idle timeout too.
    time.sleep(1.6)
    again = run_command_isolated("true", working_dir=tmp_path, mode="runsc")
    assert "reused" not in again.details
    ready = _ready_sandbox(tmp_path)
    assert not _wait_gone(ready, 15), "a sandbox booted ahead of need outlived the timeout"
    assert POOL.live() == 0


def _ready_sandbox(work, seconds: float = 60) -> str:
    """The id of the sandbox the pool booted ahead of need for ``work``, once it runs."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with POOL._lock:
            idle = [e.sandbox for entries in POOL._idle.values() for e in entries
                    if e.sandbox.spec.working_dir == str(work)]
        if idle:
            return idle[0].sandbox_id
        time.sleep(0.05)
    raise AssertionError("no sandbox was booted ahead of need")


def test_a_first_call_leaves_a_sandbox_ready_for_the_next_call_or_session(mode, tmp_path):
    """After a spec's first call the pool boots one sandbox for it in the background: the
    next call runs in it at once and says so, and a session of the same spec takes the next
    one (the pool boots another). Another spec never gets it."""
    from gvisor_magic import IsolatedSession

    first = run_command_isolated("true", working_dir=tmp_path, mode=mode)
    assert "reused" not in first.details and "ready" not in first.details
    ready = _ready_sandbox(tmp_path)
    assert _sandbox_pids(ready), "the ready sandbox is not running"
    other = tmp_path / "other"
    other.mkdir()
    elsewhere = run_command_isolated("true", working_dir=other, mode=mode)
    assert elsewhere.details.get("sandbox_id") != ready and "reused" not in elsewhere.details
    second = run_command_isolated("uname -r", working_dir=tmp_path, mode=mode)
    assert second.stdout == "4.4.0\n" and second.details["sandbox_id"] == ready
    assert "booted ahead of need" in second.details["ready"], second.details
    third = run_command_isolated("true", working_dir=tmp_path, mode=mode)
    assert third.details["sandbox_id"] == ready and "ready" not in third.details
    if mode != "runsc":
        return  # sessions keep warm sandboxes on runsc only
    with IsolatedSession(working_dir=tmp_path, mode="runsc") as session:
        result = session.run("uname -r")
        assert result.stdout == "4.4.0\n" and result.details["session"] == ready
        assert "booted ahead of need" in result.details["ready"], result.details
        again = session.run("true")
        assert "ready" not in again.details
        assert _ready_sandbox(tmp_path) != ready, "the pool did not boot a replacement"
    assert not _wait_gone(ready), "the session's sandbox outlived it"


def test_a_pool_closed_while_a_sandbox_boots_ahead_of_need_stops_it(runsc_works, tmp_path):
    run_command_isolated("true", working_dir=tmp_path, mode="runsc")
    with POOL._lock:
        booting = list(POOL._preparing.values())
    assert booting, "no sandbox is booting ahead of need after the first call"
    POOL.reset()  # what interpreter exit does (close), keeping the pool usable
    assert not any(t.is_alive() for t in booting) and POOL.live() == 0


def test_another_spec_gets_another_sandbox(runsc_works, tmp_path):
    sandbox = _warm(tmp_path, "runsc")
    limited = [run_command_isolated("ulimit -n", working_dir=tmp_path, mode="runsc",
                                    limits=Limits(max_open_files=99)) for _ in range(2)]
    assert [r.stdout for r in limited] == ["99\n", "99\n"]
    assert limited[1].details["sandbox_id"] != sandbox
    plain = run_command_isolated("ulimit -n", working_dir=tmp_path, mode="runsc")
    assert plain.details["sandbox_id"] == sandbox and plain.stdout != "99\n"


def test_a_repository_made_since_the_sandbox_started_is_protected(runsc_works, tmp_path):
    """Mounts are fixed when a sandbox starts: a .git made later needs a new sandbox."""
    sandbox = _warm(tmp_path, "runsc")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    config = (tmp_path / ".git" / "config").read_text()
    result = run_command_isolated(
        "git config core.fsmonitor 'touch /tmp/pwned' 2>&1; echo x >> .git/config",
        working_dir=tmp_path, mode="runsc")
    assert result.details.get("sandbox_id") != sandbox
    assert (tmp_path / ".git" / "config").read_text() == config


def test_reuse_off_leaves_nothing_running(runsc_works, tmp_path, monkeypatch):
    for _ in range(3):
        result = run_command_isolated("true", working_dir=tmp_path, mode="runsc", reuse=False)
        assert "reused" not in result.details
    assert POOL.live() == 0
    monkeypatch.setenv("GVISOR_MAGIC_REUSE", "off")
    for _ in range(3):
        assert "reused" not in run_command_isolated("true", working_dir=tmp_path).details
    assert POOL.live() == 0
    monkeypatch.setenv("GVISOR_MAGIC_REUSE", "perhaps")
    with pytest.raises(InvalidRequestError, match="GVISOR_MAGIC_REUSE"):
        run_command_isolated("true", working_dir=tmp_path)


def test_concurrent_calls_each_run_once(runsc_works, tmp_path):
    _warm(tmp_path, "runsc", writes="direct")
    log = tmp_path / "runs.log"
    results = []

    def call(index: int) -> None:
        # writes="direct": six sandboxes append to one file at once, which held writes
        # would turn into conflicts (each copied it before the others' lines).
        results.append(run_command_isolated(f"echo {index} >> {log}; sleep 0.3",
                                            working_dir=tmp_path, mode="runsc", writes="direct"))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.success for r in results), results
    assert sorted(log.read_text().split()) == [str(i) for i in range(6)]
    assert POOL.live() <= POOL.max_sandboxes


CALLER = """
import os, sys
from gvisor_magic import run_command_isolated
for _ in range(3):
    r = run_command_isolated("true", working_dir=sys.argv[1], mode="runsc")
other = os.path.join(sys.argv[1], "other")
os.mkdir(other)
run_command_isolated("true", working_dir=other, mode="runsc")  # boots one for a next call
print(r.details["sandbox_id"], flush=True)
sys.stdin.read()
"""


def test_a_pooled_sandbox_never_outlives_a_killed_caller(runsc_works, tmp_path):
    """A caller killed with its process group (as Jupyter kills a kernel) leaves nothing:
    its pooled sandbox ends with it, and its watcher removes the run dirs it left, the one
    of the sandbox it kept booted for a next call too, without waiting for another run."""
    caller = subprocess.Popen([sys.executable, "-c", CALLER, str(tmp_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              start_new_session=True)
    try:
        sandbox = caller.stdout.readline().decode().strip()
        assert sandbox.startswith("gvisor-magic-") and _sandbox_pids(sandbox)
        _ready_sandbox_of(caller.pid)
        os.killpg(caller.pid, signal.SIGKILL)
        caller.wait(timeout=10)
        assert not _wait_gone(sandbox, 30), "the pooled sandbox outlived its caller"
        mark = f"gvisor-magic-{caller.pid}-"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = [n for n in os.listdir(tempfile.gettempdir()) if n.startswith(mark)]
            running = [p.pid for p in psutil.process_iter(["cmdline"])
                       if any(mark in part for part in p.info["cmdline"] or [])]
            if not left and not running:
                break
            time.sleep(0.1)
        assert not left, f"the killed caller's run dirs stayed: {left}"
        assert not running, f"processes of the killed caller's sandboxes run: {running}"
    finally:
        if caller.poll() is None:
            caller.kill()


def _ready_sandbox_of(pid: int, seconds: float = 60) -> None:
    """Wait until process ``pid`` has two sandboxes (the pooled one and the one it booted
    ahead of need), each with a run dir and runsc processes."""
    mark = f"gvisor-magic-{pid}-"
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        dirs = {n for n in os.listdir(tempfile.gettempdir()) if n.startswith(mark)}
        served = {d for d in dirs for p in psutil.process_iter(["cmdline"])
                  if any(d in part for part in p.info["cmdline"] or [])}
        if len(served) >= 2:
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} did not boot a sandbox ahead of need")


def test_a_home_that_needs_stand_ins_gets_a_fresh_sandbox_each_call(runsc_works, tmp_path,
                                                                    monkeypatch):
    """Missing protected paths of a home get stand-ins mounted while a sandbox runs; a kept
    sandbox would leave them in the home after the call, so such calls are never reused."""
    monkeypatch.setenv("HOME", str(tmp_path))  # the working dir is now a home
    for _ in range(3):
        result = run_command_isolated("echo hi > out.txt", working_dir=tmp_path, mode="runsc")
        assert result.success and "reused" not in result.details
        assert "stand-ins" in result.details["not_reused"], result.details
        assert sorted(os.listdir(tmp_path)) == ["out.txt"], "marks left in the home"
    assert POOL.live() == 0


#: Sixty processes that each fork and exit in a loop (see tests/test_session.py).
FORK_RUNNERS = ("python3 -c 'import os\nfor _ in range(60):\n    if os.fork() == 0:\n"
                "        break\nelse:\n    os._exit(0)\n"
                "while True:\n    if os.fork(): os._exit(0)' &")


def test_a_call_returns_when_its_main_process_ends_and_keeps_its_sandbox(mode, tmp_path):
    """Background processes that keep forking are all killed when the call's main process
    ends: the call returns then, and the same warm sandbox serves the next call, empty."""
    sandbox = _warm(tmp_path, mode)
    for background in ("(while :; do sleep 0.01 & done) &", FORK_RUNNERS) * 2:
        result = run_command_isolated(f"{background} sleep 1.5; echo done; date +%s.%N",
                                      working_dir=tmp_path, mode=mode, timeout=30)
        returned = time.time()
        assert result.returncode == 0 and not result.timed_out, (background, result)
        assert result.stdout.split()[0] == "done" and result.details["sandbox_id"] == sandbox
        assert returned - float(result.stdout.split()[-1]) < 2.5, (background, result)
    after = run_command_isolated("ls /proc | grep -c '^[0-9]'", working_dir=tmp_path,
                                 mode=mode)
    assert after.details["sandbox_id"] == sandbox and int(after.stdout) <= 4, after


def test_no_setting_of_the_agent_or_of_the_sandbox_reaches_the_next_call(mode, tmp_path):
    """What a call may change besides files (the agent's nice value and CPU affinity, which
    later commands inherit; the mode and attributes of /tmp and HOME; /proc/sys settings;
    the agent's environment, read from /proc/1/environ) is undone before the next call."""
    look = ("nice; taskset -p $$ | cut -d: -f2; cat /proc/$$/oom_score_adj; "
            "stat -c %a /tmp ~ /dev/shm; cat /proc/sys/kernel/yama/ptrace_scope; "
            "python3 -c 'import os; print(os.listxattr(\"/tmp\"))'; "
            "tr -d '\\0' < /proc/1/environ | wc -c")
    sandbox = _warm(tmp_path, mode)
    before = run_command_isolated(look, working_dir=tmp_path, mode=mode)
    changed = run_command_isolated(
        "renice -n 19 -p 1 >/dev/null; taskset -p 1 1 >/dev/null; "
        "echo 500 > /proc/1/oom_score_adj; chmod 0777 /tmp ~ /dev/shm; "
        "python3 -c 'import os; os.setxattr(\"/tmp\", \"user.left\", b\"1\")'; "
        "echo 0 > /proc/sys/kernel/yama/ptrace_scope; cut -d' ' -f19 /proc/1/stat; "
        "taskset -p 1 | cut -d: -f2; cat /proc/1/oom_score_adj; stat -c %a /tmp ~ /dev/shm; "
        "cat /proc/sys/kernel/yama/ptrace_scope",
        working_dir=tmp_path, mode=mode)
    assert changed.stdout.split() == ["19", "1", "500", "777", "777", "777", "0"], changed
    after = run_command_isolated(look, working_dir=tmp_path, mode=mode)
    assert after.details["sandbox_id"] == changed.details["sandbox_id"] == sandbox
    assert after.stdout == before.stdout, (before.stdout, after.stdout)
    assert after.stdout.split()[-2:] == ["[]", "0"], after.stdout
