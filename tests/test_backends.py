"""The result contract, checked against the real runsc, Docker with runsc, and the host fallback.

Every test here runs real processes: runsc sandboxes built from OCI bundles,
and plain host processes for the subprocess backend.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import threading
import time
import uuid

import psutil
import pytest

from gvisor_magic import CommandInterrupted, run_command_isolated

GVISOR_RELEASE = "4.4.0"


@pytest.fixture(params=["runsc", "docker", "subprocess"])
def mode(request):
    if request.param != "subprocess":
        request.getfixturevalue(f"{request.param}_works")
    return request.param


@pytest.fixture(params=["runsc", "docker"])
def sandboxed(request):
    """A gVisor backend: runsc directly, or Docker with the runsc runtime."""
    request.getfixturevalue(f"{request.param}_works")
    return request.param


def test_gvisor_backends_run_under_gvisor_and_subprocess_on_the_host(sandboxed):
    inside = run_command_isolated(["uname", "-r"], mode=sandboxed)
    assert inside.stdout.strip() == GVISOR_RELEASE
    assert inside.backend == sandboxed and inside.isolated and inside.success
    assert inside.fallback_reason is None
    host = run_command_isolated(["uname", "-r"], mode="subprocess")
    assert host.stdout.strip() == platform.release() != GVISOR_RELEASE
    assert host.backend == "subprocess" and not host.isolated
    assert "subprocess" in host.fallback_reason


@pytest.mark.parametrize(("script", "code"), [
    ("exit 0", 0), ("exit 1", 1), ("exit 42", 42), ("exit 137", 137),
    ("kill -TERM $$", -signal.SIGTERM), ("kill -KILL $$", -signal.SIGKILL),
    # Signals Python ignores must reach the command with their default action.
    ("kill -PIPE $$", -signal.SIGPIPE), ("yes | head -c 1 >/dev/null; exit $?", 0),
])
def test_exit_codes_and_signals_come_back_exactly(mode, script, code):
    result = run_command_isolated(script, mode=mode)
    assert result.returncode == code
    assert result.success is (code == 0)
    assert not result.timed_out


def test_stdout_and_stderr_are_separate(mode):
    result = run_command_isolated("echo to-out; echo to-err >&2; echo more-out", mode=mode)
    assert result.stdout == "to-out\nmore-out\n"
    assert result.stderr == "to-err\n"


def test_argv_is_not_interpreted_by_a_shell(mode):
    result = run_command_isolated(["printf", "%s|", "a b", "$HOME", "*"], mode=mode)
    assert result.stdout == "a b|$HOME|*|"


def test_unknown_program_is_a_result_not_an_exception(mode):
    result = run_command_isolated(["no-such-program-xyz"], mode=mode)
    assert result.returncode == 127
    assert "no-such-program-xyz" in result.stderr


def test_output_is_streamed_live(mode, tmp_path):
    """The command waits until the callback has seen its first line: batching would hang."""
    go = tmp_path / "go"
    seen: list[tuple[str, str]] = []

    def on_output(stream: str, text: str) -> None:
        seen.append((stream, text))
        if "first" in text:
            go.touch()

    script = f"echo first; for i in $(seq 100); do [ -e {go} ] && break; sleep 0.1; done; " \
             f"[ -e {go} ] && echo second || echo never-saw-the-callback"
    result = run_command_isolated(script, mode=mode, working_dir=tmp_path, timeout=60,
                                  on_output=on_output)
    assert result.stdout == "first\nsecond\n"
    assert "".join(t for s, t in seen if s == "stdout") == result.stdout


def test_stdin_is_fed_and_otherwise_empty(mode):
    fed = run_command_isolated(["cat"], mode=mode, stdin="line one\nline two\n")
    assert fed.stdout == "line one\nline two\n"
    empty = run_command_isolated(["cat"], mode=mode, timeout=20)
    assert empty.stdout == "" and empty.success and not empty.timed_out


def test_invalid_utf8_is_replaced_and_the_command_runs_once(mode, tmp_path):
    marker = tmp_path / "runs.log"
    result = run_command_isolated(
        f"printf 'ok \\377\\376 end\\n'; printf '\\377' >&2; echo ran >> {marker}",
        mode=mode, working_dir=tmp_path)
    assert result.stdout == "ok \ufffd\ufffd end\n"
    assert result.stderr == "\ufffd"
    assert marker.read_text() == "ran\n"


def test_output_cap_truncates_capture_but_streams_everything(mode):
    streamed = []
    result = run_command_isolated(
        "head -c 5000 /dev/zero | tr '\\0' x", mode=mode, max_output=1000,
        on_output=lambda s, t: streamed.append(t))
    assert result.truncated
    assert result.stdout == "x" * 1000
    assert "".join(streamed) == "x" * 5000


def test_host_environment_is_not_inherited(mode, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "s3cr3t-value")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    result = run_command_isolated("env", mode=mode, env={"GIVEN": "yes"})
    assert "s3cr3t-value" not in result.stdout
    assert "SECRET_TOKEN" not in result.stdout
    assert "GIVEN=yes" in result.stdout.splitlines()
    assert "LC_ALL=C.UTF-8" in result.stdout.splitlines()


def test_working_dir_is_read_write_and_owned_by_the_caller(mode, tmp_path):
    result = run_command_isolated("pwd; echo data > made.txt; mkdir sub && echo x > sub/y",
                                  mode=mode, working_dir=tmp_path)
    assert result.success, result.stderr
    assert result.stdout.strip() == str(tmp_path)
    for path in (tmp_path / "made.txt", tmp_path / "sub", tmp_path / "sub" / "y"):
        assert path.stat().st_uid == os.getuid()
        assert path.stat().st_gid == os.getgid()
    assert (tmp_path / "made.txt").read_text() == "data\n"


def test_default_working_dir_is_fresh_and_removed(mode):
    result = run_command_isolated("pwd; ls -A | wc -l; touch left-over", mode=mode)
    cwd, count = result.stdout.split()
    assert count == "0"
    assert not os.path.exists(cwd), "the temporary working dir was not removed"


def test_writes_outside_the_working_dir_do_not_reach_the_host(sandboxed, tmp_path):
    name = f"gvm-escape-{uuid.uuid4().hex}"
    script = "; ".join(f"(echo x > {d}/{name}) 2>/dev/null; echo $?" for d in
                       ("/usr", "/etc", "/tmp", "/", os.path.dirname(tmp_path)))
    result = run_command_isolated(script, mode=sandboxed, working_dir=tmp_path)
    codes = result.stdout.split()
    assert codes[2] == "0", "the private /tmp should be writable inside"
    assert "0" not in (codes[0], codes[1], codes[3]), "system dirs must be read-only"
    for directory in ("/usr", "/etc", "/tmp", "/", os.path.dirname(tmp_path)):
        assert not os.path.exists(os.path.join(directory, name))


def test_repo_path_is_read_only(sandboxed, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "code.py").write_text("original\n")
    work = tmp_path / "work"
    work.mkdir()
    result = run_command_isolated(
        f"cat {repo}/code.py; echo changed > {repo}/code.py; echo rc=$?; touch {repo}/new; "
        f"cp {repo}/code.py copied.txt", mode=sandboxed, working_dir=work, repo_path=repo)
    assert result.stdout.startswith("original\n")
    assert "rc=0" not in result.stdout and "Read-only file system" in result.stderr
    assert (repo / "code.py").read_text() == "original\n"
    assert not (repo / "new").exists()
    assert (work / "copied.txt").read_text() == "original\n"


def test_host_secrets_and_homes_are_not_visible(sandboxed, tmp_path):
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "id_ed25519").write_text("PRIVATE KEY")
    (tmp_path / ".netrc").write_text("machine x password hunter2")
    result = run_command_isolated(
        "cat /etc/shadow; ls /home; ls -A /root; cat .ssh/id_ed25519 .netrc; "
        "ls /var/run/secrets; ls /var/run/docker.sock", mode=sandboxed, working_dir=tmp_path)
    everything = result.stdout + result.stderr
    assert "PRIVATE KEY" not in everything and "hunter2" not in everything
    assert "root:" not in result.stdout
    assert "No such file" in result.stderr
    assert ".ssh" in result.details["masked_secrets"]
    assert (tmp_path / ".ssh" / "id_ed25519").read_text() == "PRIVATE KEY"


@pytest.fixture
def host_tcp_server():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.sendall(b"hello-from-host\n")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


CONNECT = ("import socket,sys\n"
           "try:\n"
           "    s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=3)\n"
           "    print(s.recv(100).decode().strip())\n"
           "except OSError as e:\n"
           "    print('blocked', type(e).__name__)\n")


def test_host_loopback_is_unreachable_without_network(sandboxed, host_tcp_server):
    import sys

    isolated = run_command_isolated([sys.executable, "-c", CONNECT, str(host_tcp_server)],
                                    mode=sandboxed)
    assert isolated.stdout.startswith("blocked"), isolated.stdout + isolated.stderr
    assert not isolated.network
    host = run_command_isolated([sys.executable, "-c", CONNECT, str(host_tcp_server)],
                                mode="subprocess")
    assert host.stdout.strip() == "hello-from-host"


# A duration no other program on the machine is likely to sleep for: the checks
# below look for survivors by their command line.
LONG = str(9000 + os.getpid() % 900)


def _sleepers() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if (p.info["cmdline"] or [])[:2] == ["sleep", LONG]]


def test_timeout_kills_the_whole_tree(mode):
    start = time.monotonic()
    result = run_command_isolated(f"echo started; sleep {LONG} & sleep {LONG}", mode=mode,
                                  timeout=1)
    elapsed = time.monotonic() - start
    assert result.timed_out and result.returncode == 124 and not result.success
    assert result.stdout == "started\n", "partial output is kept"
    assert elapsed < 15
    assert not _sleepers(), "a sleep survived the timeout"


def test_interrupt_kills_the_command_and_keeps_partial_output(mode):
    main = threading.main_thread()
    seen = threading.Event()

    def on_output(stream: str, text: str) -> None:
        seen.set()

    def interrupt() -> None:
        seen.wait(30)
        time.sleep(0.2)
        signal.pthread_kill(main.ident, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(CommandInterrupted) as caught:
        run_command_isolated(f"echo partial; sleep {LONG} & sleep {LONG}", mode=mode, timeout=60,
                             on_output=on_output)
    assert isinstance(caught.value, KeyboardInterrupt)
    assert caught.value.result.stdout == "partial\n"
    assert caught.value.result.backend == mode
    assert not _sleepers()


def test_callback_errors_stop_the_command_and_propagate(mode):
    def on_output(stream: str, text: str) -> None:
        raise RuntimeError("consumer failed")

    start = time.monotonic()
    with pytest.raises(RuntimeError, match="consumer failed"):
        run_command_isolated(f"echo a; sleep {LONG}", mode=mode, timeout=60, on_output=on_output)
    assert time.monotonic() - start < 20
    assert not _sleepers()
