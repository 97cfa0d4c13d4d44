"""IsolatedSession: a warm runsc sandbox, its protocol, and what a hostile command can do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pytest

from gvisor_magic import (
    CommandInterrupted,
    IsolatedSession,
    IsolationUnavailable,
)


@pytest.fixture(params=["runsc", "docker"])
def session(request, tmp_path):
    request.getfixturevalue(f"{request.param}_works")
    with IsolatedSession(tmp_path, mode=request.param) as warm:
        assert warm.state == "warm" and warm.backend == request.param
        yield warm
    assert warm.state == "closed"


def test_commands_run_in_one_warm_gvisor_sandbox(session, tmp_path):
    first = session.run("uname -r; echo kept > /tmp/note; echo home > ~/note; pwd")
    assert first.stdout == f"4.4.0\n{tmp_path}\n" and first.isolated
    assert first.backend == session.backend
    second = session.run("cat /tmp/note ~/note")
    assert second.stdout == "kept\nhome\n"
    assert first.details["session"] == second.details["session"]


def test_exit_codes_signals_streams_stdin_env_and_cwd(session, tmp_path):
    assert session.run("exit 42").returncode == 42
    assert session.run("exit 137").returncode == 137
    assert session.run("kill -TERM $$").returncode == -signal.SIGTERM
    assert session.run("kill -PIPE $$").returncode == -signal.SIGPIPE
    assert session.run("yes | head -c 3").stderr == ""
    both = session.run("echo out; echo err >&2")
    assert (both.stdout, both.stderr) == ("out\n", "err\n")
    assert session.run(["cat"], stdin="fed\n").stdout == "fed\n"
    assert session.run(["cat"], timeout=20).stdout == ""
    assert session.run("echo $ONLY_HERE", env={"ONLY_HERE": "yes"}).stdout == "yes\n"
    assert session.run("echo ${ONLY_HERE:-unset}").stdout == "unset\n"
    (tmp_path / "sub").mkdir()
    assert session.run("pwd", cwd=tmp_path / "sub").stdout == f"{tmp_path}/sub\n"
    assert session.run(["no-such-program"]).returncode == 127


def test_each_command_sees_what_sh_c_would_give_it(session, tmp_path):
    """Commands reach a shell started ahead of time; nothing of that may show."""
    (tmp_path / "sub").mkdir()
    fresh = session.run("env | sort; echo $0; pwd", env={"A": "1"}).stdout
    # A different cwd and environment, values with quotes and newlines, a removed variable.
    odd = "it's \"quoted\"\n$HOME `x` \\"
    moved = session.run('printf %s "$ODD"; echo; env | grep -c "^A=\\|OLDPWD"; pwd',
                        cwd=tmp_path / "sub", env={"ODD": odd})
    assert moved.stdout == f"{odd}\n0\n{tmp_path}/sub\n"
    assert session.run("env | sort; echo $0; pwd", env={"A": "1"}).stdout == fresh
    # What one command was given stays out of the next one's shell, /proc included.
    assert session.run("echo $A", env={"A": "given-to-one"}).stdout == "given-to-one\n"
    assert session.run("tr '\\0' '\\n' < /proc/$$/environ | grep -c given-to-one"
                       ).stdout == "0\n"
    assert "A=1\n" in fresh and fresh.endswith(f"sh\n{tmp_path}\n")
    # A multi-line script with a here-document; a syntax error; an argv list.
    script = "if true; then\n  cat <<EOF\nline $((1 + 1))\nEOF\nfi\nexit 3\necho never"
    assert (session.run(script).stdout, session.run(script).returncode) == ("line 2\n", 3)
    broken = session.run("echo 'unterminated")
    assert broken.returncode == 2 and "Unterminated quoted string" in broken.stderr
    assert session.run(["sh", "-c", 'echo "$0:$1"', "zero", "one $HOME"]).stdout == \
        "zero:one $HOME\n"
    assert session.run(["sh", "-c", "kill -KILL $$"]).returncode == -signal.SIGKILL
    # A script longer than a pipe holds, whose first command reads stdin while the rest
    # is still arriving.
    long = "head -c 5; echo\n" + "true\n" * 40000 + "echo end"
    assert session.run(long, stdin="fed-in").stdout == "fed-i\nend\n"


@pytest.mark.parametrize("mode", ["runsc", "docker"])
def test_a_bash_session_starts_bash_ahead_and_nothing_of_that_shows(mode, request, tmp_path):
    """The magics run cells with bash: the agent keeps a bash started for them. A command
    that must start its own (BASH_ENV is read at start-up) is the reference."""
    import shutil

    request.getfixturevalue(f"{mode}_works")
    probe = ('echo "$0|$BASH_EXECUTION_STRING|$-|$SHLVL|$LINENO|$BASH_VERSION"; '
             "shopt | md5sum; set -o | md5sum; env | grep -v '^BASH_ENV=' | sort; "
             "trap | wc -l; ulimit -a | md5sum; exit 7")
    with IsolatedSession(tmp_path, mode=mode, shell=shutil.which("bash")) as warm:
        ahead = warm.run(probe, env={"NOTE": "it's"})
        fresh = warm.run(probe, env={"NOTE": "it's", "BASH_ENV": "/dev/null"})
        assert (ahead.returncode, fresh.returncode) == (7, 7)
        assert ahead.stdout == fresh.stdout, (ahead.stdout, fresh.stdout)
        assert ahead.stdout.startswith(f"{shutil.which('bash')}|{probe}|hBc|1|1|5.")
        # What one command set stays out of the next one's bash.
        warm.run("shopt -s extglob; set -o noclobber; export LEAK=1; alias ll=ls")
        assert warm.run(probe, env={"NOTE": "it's"}).stdout == ahead.stdout
        # A one-program line is exec'd in place of the shell, as `bash -c` does: no fork.
        for line in ("grep PPid /proc/self/status", "ls /no-such-dir", "no-such-program x",
                     "env -u NOTE sh -c 'exit 3'", "true", "cd /no/such"):
            ahead = warm.run(line, env={"NOTE": "x"})
            fresh = warm.run(line, env={"NOTE": "x", "BASH_ENV": "/dev/null"})
            assert (ahead.returncode, ahead.stdout) == (fresh.returncode, fresh.stdout), line
            assert ahead.stderr.split(":")[-1] == fresh.stderr.split(":")[-1], line
        assert warm.run("grep PPid /proc/self/status").stdout == "PPid:\t1\n"
        assert warm.run("sleep 30", timeout=1).timed_out
        # Only the shell's own prefix of a syntax error differs.
        broken = warm.run("echo 'unterminated")
        assert broken.returncode == 2 and "unexpected EOF while looking for matching" in \
            broken.stderr


def test_output_streams_live(session, tmp_path):
    go = tmp_path / "go"

    def on_output(stream: str, text: str) -> None:
        if "first" in text:
            go.touch()

    result = session.run(f"echo first; for i in $(seq 100); do [ -e {go} ] && break; "
                         f"sleep 0.1; done; [ -e {go} ] && echo second", on_output=on_output,
                         timeout=60)
    assert result.stdout == "first\nsecond\n"


def test_timeout_kills_the_tree_and_the_session_survives(session):
    start = time.monotonic()
    result = session.run("echo started; sleep 1000 & setsid sleep 1000 & sleep 1000", timeout=1)
    assert result.timed_out and result.returncode == 124 and result.stdout == "started\n"
    assert time.monotonic() - start < 10
    after = session.run("ps -e -o comm= | sort | uniq -c")
    assert "sleep" not in after.stdout, after.stdout
    assert after.details["session"] == result.details["session"]


def test_leftover_background_processes_do_not_outlive_their_command(session):
    session.run("sleep 1000 & nohup sleep 1000 >/dev/null 2>&1 &")
    assert "sleep" not in session.run("ps -e -o comm=").stdout


def test_nothing_of_a_command_but_tmp_and_home_reaches_the_next(session):
    """Commands that try hard to leave something for the next one: processes that left
    their session or re-parented, one that ignores SIGTERM, files in /dev and /dev/shm,
    SysV IPC objects, a lowered limit of PID 1 (every later command would inherit it)."""
    first = session.run(
        "echo kept > /tmp/kept; touch /dev/shm/left /dev/left; mkdir /dev/shm/dir; "
        "setsid sleep 1000 & (sleep 1000 &) & sh -c 'trap \"\" TERM HUP; exec sleep 1000' & "
        "ipcmk -Q && ipcmk -M 4096 && ipcmk -S 2 && ipcs -s | grep -c '^0x'; "
        "prlimit --pid 1 --nofile=300: || echo refused")
    assert first.stdout.split()[-2:] == ["1", "refused"], first.describe() + first.stdout
    assert "Operation not permitted" in first.stderr, first.stderr
    second = session.run("ps -e -o comm=; ls -a /dev/shm; ls /dev/left; ulimit -n; "
                         "echo fds $(ls /proc/$$/fd); echo not-pipes $(ls -l /proc/$$/fd | "
                         "grep -c -v -e pipe: -e '^total'); "
                         "cat /tmp/kept; ipcs -s | grep -c '^0x'; "
                         "python3 -c 'import ctypes; c = ctypes.CDLL(None); "
                         "print([c.msgctl(i, 2, ctypes.create_string_buffer(256)) for i in "
                         "range(1, 8)], [c.shmctl(i, 2, ctypes.create_string_buffer(256)) "
                         "for i in range(1, 8)])'")
    lines = second.stdout.splitlines()
    assert "sleep" not in second.stdout, second.stdout
    assert "left" not in second.stdout and "dir" not in second.stdout, second.stdout
    assert "300" not in lines, second.stdout
    assert "kept" in lines, "what the docs promise does carry over"
    # The shell holds its own pipes only (standard streams; its script, which dash keeps at
    # fd 10; 3 is $(...)'s own): nothing of the agent's or of the last command's. (It is a
    # new process, so no signal meant for the last command can be pending for it.)
    fds = next(line for line in lines if line.startswith("fds ")).split()[1:]
    assert set(fds) <= {"0", "1", "2", "3", "10"}, lines
    assert "not-pipes 0" in lines, lines
    # No semaphore set, and no message queue or shared memory (IPC_STAT: -1 for every id).
    assert lines[-2] == "0" and lines[-1] == f"{[-1] * 7} {[-1] * 7}", lines
    assert second.details["session"] == first.details["session"]
    assert "session_note" not in second.details, second.details


def test_interrupt_kills_the_command_and_keeps_the_session(session):
    main = threading.main_thread()
    seen = threading.Event()

    def interrupt() -> None:
        seen.wait(30)
        time.sleep(0.2)
        signal.pthread_kill(main.ident, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(CommandInterrupted) as caught:
        session.run("echo partial; trap '' INT; sleep 1000", timeout=60,
                    on_output=lambda s, t: seen.set())
    assert caught.value.result.stdout == "partial\n"
    assert session.run("echo fine").stdout == "fine\n"


@pytest.mark.parametrize("command", [["sleep", "1000"], "sleep 1000",
                                     "trap '' INT TERM; sleep 1000"])
def test_an_interrupted_command_reports_what_happened(session, command):
    """The result of an interrupted warm command says it was killed (never exit 0 or
    success), and the message says the warm sandbox was kept, as it was."""
    main = threading.main_thread()
    first = session.run("true")

    def interrupt() -> None:
        time.sleep(1.0)
        signal.pthread_kill(main.ident, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(CommandInterrupted) as caught:
        session.run(command, timeout=60)
    result = caught.value.result
    assert result.returncode == -9 and not result.success, result.describe()
    assert "killed by SIGKILL" in result.describe()
    assert "warm sandbox was kept" in str(caught.value)
    after = session.run("echo fine")
    assert after.stdout == "fine\n" and after.details["session"] == first.details["session"]


def test_a_dead_sandbox_is_reported_and_replaced_without_a_rerun(session, tmp_path):
    # writes="direct": the marker shows each run on the host, and the writes of a command
    # whose sandbox died are never applied when held.
    session.close()
    session = IsolatedSession(tmp_path, mode=session.backend, writes="direct")
    session.start()
    marker = tmp_path / "runs.log"
    seen = threading.Event()

    def kill_sandbox() -> None:
        seen.wait(30)
        for process in psutil.process_iter(["cmdline"]):
            cmdline = process.info["cmdline"] or []
            if "boot" in cmdline and any(session.sandbox_id in part for part in cmdline):
                os.kill(process.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_sandbox)
    killer.start()
    result = session.run(f"echo ran >> {marker}; echo started; sleep 60", timeout=120,
                         on_output=lambda s, t: seen.set())
    killer.join()
    assert not result.success and result.error and "fresh sandbox" in result.error
    assert marker.read_text() == "ran\n"
    again = session.run("uname -r")
    session.close()
    assert again.stdout == "4.4.0\n" and "replaced" in again.details["session_note"]
    assert marker.read_text() == "ran\n", "the interrupted command must not run again"


def test_frame_lookalikes_in_output_are_just_output(session):
    fake = r'X\000\000\000\017{"exit": 0}'
    result = session.run(f"printf '{fake}'; exit 3")
    assert result.returncode == 3
    assert result.stdout == 'X\x00\x00\x00\x0f{"exit": 0}'


def test_idle_timeout_and_idempotent_close(runsc_works, tmp_path):
    warm = IsolatedSession(tmp_path, idle_timeout=0.5)
    assert warm.run("echo a").stdout == "a\n" and warm.state == "warm"
    deadline = time.monotonic() + 10
    while warm.state == "warm" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert warm.state == "stopped"
    after = warm.run("echo b")
    assert after.stdout == "b\n"
    # The lost /tmp and HOME are said, never silent.
    assert "idle" in after.details["session_note"] and "start empty" in after.details[
        "session_note"], after.details
    assert "session_note" not in warm.run("true").details
    warm.close()
    warm.close()
    with pytest.raises(RuntimeError, match="closed"):
        warm.run("true")


def test_sessions_close_at_interpreter_exit(runsc_works, tmp_path):
    code = ("from gvisor_magic import IsolatedSession\n"
            f"s = IsolatedSession({str(tmp_path)!r}); print(s.run('uname -r').stdout.strip())\n")
    env = {**os.environ, "TMPDIR": tempfile.gettempdir()}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.stdout.strip() == "4.4.0", done.stderr


def test_without_runsc_a_session_runs_one_shot_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("GVISOR_MAGIC_RUNSC", "/bin/false")
    monkeypatch.setenv("GVISOR_MAGIC_DOCKER_RUNTIME", "no-such-runtime")
    with IsolatedSession(tmp_path) as cold:
        result = cold.run("echo hi")
        assert cold.state == "one-shot" and "runsc" in cold.cold_reason
    assert result.backend == "subprocess" and not result.isolated
    assert result.fallback_reason and "one-shot" in result.details["session"]
    with pytest.raises(IsolationUnavailable):
        IsolatedSession(tmp_path, require_isolation=True).run("echo never")
    with pytest.raises(IsolationUnavailable):
        IsolatedSession(tmp_path, mode="runsc").start()


def test_directories_of_a_dead_owner_are_removed(runsc_works, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = os.path.join(tempfile.gettempdir(), f"gvisor-magic-{dead.pid}-abc123")
    os.makedirs(os.path.join(stale, "bundle", "rootfs"))
    with IsolatedSession(tmp_path) as warm:
        assert warm.run("true").success
    assert not os.path.exists(stale), "a directory left by a dead process survived"


def test_threads_share_a_session_safely(session):
    results: list = []

    def worker(index: int) -> None:
        results.append(session.run(f"echo {index}; sleep 0.05; echo done-{index}"))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(r.stdout for r in results) == sorted(f"{i}\ndone-{i}\n" for i in range(6))
    assert all(r.success for r in results)


@pytest.mark.parametrize("mode", ["runsc", "docker"])
def test_two_hundred_commands_leak_nothing(mode, request, tmp_path):
    request.getfixturevalue(f"{mode}_works")
    me = psutil.Process()
    dirs = set(os.listdir(tempfile.gettempdir()))
    with IsolatedSession(tmp_path, mode=mode) as warm:
        for _ in range(10):
            warm.run(["true"])
        fds, children = me.num_fds(), len(me.children(recursive=True))
        for index in range(200):
            assert warm.run(["true"]).success, index
        assert me.num_fds() <= fds + 2
        assert len(me.children(recursive=True)) == children
    assert not [p for p in me.children(recursive=True) if "runsc" in p.name()]
    assert set(os.listdir(tempfile.gettempdir())) <= dirs, "temporary directories left"


def test_docker_output_is_streamed_not_logged_to_the_daemons_disk(docker_works, tmp_path):
    import docker

    with IsolatedSession(tmp_path, mode="docker") as warm:
        client = docker.from_env()
        (container,) = client.containers.list(
            filters={"label": f"io.github.gvisor-magic.owner-pid={os.getpid()}"})
        result = warm.run("head -c 3000000 /dev/zero | tr '\\0' x")
        assert len(result.stdout) == 3000000
        container.reload()
        assert container.attrs["HostConfig"]["LogConfig"]["Type"] == "none"
        assert not container.attrs["LogPath"] or not os.path.exists(container.attrs["LogPath"])
        client.close()



#: Keeps forking children that live 10 ms.
FORK_LOOP = "(while :; do sleep 0.01 & done) &"
#: Sixty processes that each fork and exit in a loop: their pids change faster than the
#: sandbox's process list can be read and each pid in it killed (killing them that way,
#: a few rounds, left some running here: the command came back at its timeout).
FORK_RUNNER = ("python3 -c 'import os\nfor _ in range(60):\n    if os.fork() == 0:\n"
               "        break\nelse:\n    os._exit(0)\n"
               "while True:\n    if os.fork(): os._exit(0)' &")
GVISOR_ONLY = '[ "$(uname -r)" = 4.4.0 ] || { echo NOT-GVISOR; exit 99; }; '


def test_a_command_returns_when_its_main_process_ends(session):
    """What the main process left in the background, however fast it forks, is killed all
    at once when it ends, and the result comes back then (with everything written before)."""
    for run in range(5):
        for background in (FORK_LOOP, FORK_RUNNER):
            result = session.run(f"{background} sleep 1.5; echo done; date +%s.%N", timeout=30)
            returned = time.time()
            assert result.returncode == 0 and not result.timed_out, (run, background, result)
            assert result.stdout.split()[0] == "done" and result.error is None, result
            # From the main process's last line to the host's result: the kill and the drain
            # (the main process itself is slowed by what it started, on 2 loaded cores).
            assert returned - float(result.stdout.split()[-1]) < 2.5, (run, background, result)
            assert result.duration < 10, (run, background, result.duration)
    after = session.run("ls /proc | grep -c '^[0-9]'")
    assert int(after.stdout) <= 4, after.stdout  # the agent, sh, ls and grep
    assert "session_note" not in after.details, after.details


def test_a_background_fork_bomb_leaves_the_session_usable(session):
    """A fork bomb under the session's process limit, left running by a command whose main
    process ends: the same sandbox runs the next command, with nothing of it left."""
    first = session.run("echo kept > /tmp/marker; uname -r")
    assert first.stdout == "4.4.0\n"
    bomb = session.run(GVISOR_ONLY + "b() { while :; do b & done; }; b 2>/dev/null & "
                       f"{FORK_RUNNER} sleep 1.5; echo done", timeout=60)
    assert "NOT-GVISOR" not in bomb.stdout
    assert not bomb.timed_out and bomb.error is None and "done" in bomb.stdout, bomb
    after = session.run("cat /tmp/marker; ls /proc | grep -c '^[0-9]'")
    assert after.stdout.split()[0] == "kept" and int(after.stdout.split()[1]) <= 4, after
    assert "session_note" not in after.details, after.details
    assert after.details["session"] == first.details["session"]  # the sandbox's id


#: Changes a command may make (as the caller, who is also the agent's effective uid) that
#: every later command would inherit or see.
CHANGE = (
    "renice -n 19 -p 1 >/dev/null; taskset -p 1 1 >/dev/null; echo 500 > /proc/1/oom_score_adj; "
    "chmod 0777 /tmp; chmod 0755 ~; "
    "python3 -c 'import os; os.setxattr(\"/tmp\", \"user.left\", b\"1\"); "
    "os.setxattr(os.path.expanduser(\"~\"), \"user.left\", b\"1\")'; "
    "chmod 000 /dev/null; chmod 0777 /dev/shm; "
    "echo 0 > /proc/sys/kernel/yama/ptrace_scope; "
    "echo 20000 60000 > /proc/sys/net/ipv4/ip_local_port_range; "
    "cut -d' ' -f19 /proc/1/stat; taskset -p 1 | cut -d: -f2; cat /proc/1/oom_score_adj; "
    "stat -c %a /tmp ~ /dev/null /dev/shm; cat /proc/sys/kernel/yama/ptrace_scope")
LOOK = (
    "nice; cut -d' ' -f19 /proc/1/stat; taskset -p $$ | cut -d: -f2; cat /proc/$$/oom_score_adj; "
    "stat -c %a /tmp ~ /dev/null /dev/shm; cat /proc/sys/kernel/yama/ptrace_scope; "
    "cat /proc/sys/net/ipv4/ip_local_port_range; "
    "python3 -c 'import os; print(os.listxattr(\"/tmp\") + "
    "os.listxattr(os.path.expanduser(\"~\")))'; "
    "tr -d '\\0' < /proc/1/environ | wc -c")


def test_no_setting_of_the_agent_or_of_the_sandbox_carries_over(session, tmp_path):
    """A command may renice the agent or pin it to one CPU (every later command would
    inherit that), chmod or setfattr /tmp and HOME, chmod /dev's nodes and write the
    sandbox's /proc/sys (this caller is root), read the agent's environment: none of it
    reaches the next command, which runs in the same sandbox."""
    before = session.run(LOOK)
    assert before.returncode == 0, before
    changed = session.run(CHANGE)
    # Each change was made (root caller: owner of /tmp, /dev/null and /proc/sys's files).
    assert changed.stdout.split() == ["19", "1", "500", "777", "755", "0", "777", "0"], (
        changed.stdout, changed.stderr)
    after = session.run(LOOK)
    assert after.stdout == before.stdout, (before.stdout, after.stdout)
    lines = after.stdout.splitlines()
    assert lines[:2] == ["0", "0"] and lines[-2:] == ["[]", "0"], lines
    assert lines[4:8] == ["1777", "700", "666", "1777"], lines
    assert after.details["session"] == changed.details["session"]
    assert "session_note" not in after.details, after.details
    # A working-dir subdirectory the command ran in and removed: the agent's cwd is gone.
    (tmp_path / "sub").mkdir()
    assert session.run("cd .. && rmdir sub", cwd=tmp_path / "sub").returncode == 0
    again = session.run("pwd; echo fine")
    assert again.stdout == f"{tmp_path}\nfine\n" and "session_note" not in again.details


MQ_OPEN = ("python3 -c 'import ctypes, sys; c = ctypes.CDLL(None, use_errno=True); "
           "print(c.mq_open(b\"/gvm-left\", int(sys.argv[1]), 0o600, None), "
           "ctypes.get_errno())' ")


def test_a_posix_message_queue_does_not_carry_over(session):
    """gVisor lets nothing unprivileged remove a POSIX message queue (mq_unlink: EACCES, the
    owner's included): a command that leaves one gets its sandbox replaced, and says so."""
    made = session.run(MQ_OPEN + "66; ls /dev/mqueue")  # O_CREAT | O_RDWR
    assert made.stdout.split()[1:] == ["0", "gvm-left"], made
    after = session.run(MQ_OPEN + "2; ls /dev/mqueue")  # O_RDWR: ENOENT
    assert after.stdout.split() == ["-1", "2"], after
    assert "message queue" in after.details["session_note"], after.details
