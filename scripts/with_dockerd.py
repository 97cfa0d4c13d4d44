#!/usr/bin/env python3
"""Run a command with a Docker daemon reachable, and stop only what we started.

    python3 scripts/with_dockerd.py -- CMD ARGS...   # run CMD, dockerd up meanwhile
    python3 scripts/with_dockerd.py --start-only     # start dockerd if needed, leave it
    python3 scripts/with_dockerd.py --status         # does a daemon answer? (exit 0/1)

If the Docker socket already answers ``GET /_ping``, CMD just runs. Otherwise
``dockerd`` is started in the background (log: ``$TMPDIR/gvm-dockerd.log``),
CMD runs once it answers, and afterwards dockerd (and a containerd it started
as its child) is stopped, also when CMD fails or this script is interrupted or
sent SIGTERM. The exit status is CMD's. Where no dockerd can run (no binary,
not root), CMD still runs: the Docker tests then report or skip themselves.

Standard library only: this runs before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

DEFAULT_SOCKET = "/var/run/docker.sock"
PIDFILE = "/var/run/docker.pid"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
PROGRESS_EVERY = 5.0
# Not "gvisor-magic-*": the test suite's leak check owns those names in /tmp.
LOG_NAME = "gvm-dockerd.log"


def say(message: str) -> None:
    print(f"with_dockerd: {message}", file=sys.stderr, flush=True)


def socket_path() -> str:
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://"):
        return host[len("unix://"):]
    return DEFAULT_SOCKET


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def ping(path: str | None = None, timeout: float = 3.0) -> str | None:
    """None if the daemon answers ``/_ping`` with OK, else why not."""
    path = path or socket_path()
    if not os.path.exists(path):
        return f"{path} does not exist"
    conn = _UnixHTTPConnection(path, timeout)
    try:
        conn.request("GET", "/_ping")
        response = conn.getresponse()
        body = response.read(64).decode("ascii", "replace").strip()
    except (OSError, http.client.HTTPException) as exc:
        return f"{path} does not answer: {exc}"
    finally:
        conn.close()
    if response.status != 200 or body != "OK":
        return f"{path} answered {response.status} {body!r}"
    return None


def find_dockerd() -> str | None:
    found = shutil.which("dockerd")
    if found:
        return found
    for candidate in ("/usr/sbin/dockerd", "/usr/bin/dockerd", "/usr/local/bin/dockerd"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


# -- processes, read from /proc (no psutil here) ----------------------------------

def _stat(pid: int) -> tuple[str, int, str] | None:
    """(comm, ppid, start time) of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    # fields[0] is the state, [1] the ppid, [19] the start time (field 22).
    return comm, int(fields[1]), fields[19]


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def running_dockerds() -> list[int]:
    return [pid for pid in _pids() if (_stat(pid) or ("",))[0] == "dockerd"]


def _children(pid: int, comm: str) -> list[tuple[int, str]]:
    """Children of ``pid`` named ``comm``, with their start times (to spot pid reuse)."""
    found = []
    for child in _pids():
        info = _stat(child)
        if info and info[1] == pid and info[0] == comm:
            found.append((child, info[2]))
    return found


def _same_process(pid: int, started: str) -> bool:
    info = _stat(pid)
    return info is not None and info[2] == started


def _wait_gone(pid: int, started: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _same_process(pid, started):
            return True
        time.sleep(0.2)
    return not _same_process(pid, started)


def _stop_pid(pid: int, started: str, name: str, timeout: float) -> None:
    """SIGTERM, wait, SIGKILL: only if ``pid`` is still the process we mean."""
    if not _same_process(pid, started):
        return
    say(f"stopping {name} (pid {pid})")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait_gone(pid, started, timeout):
        return
    say(f"{name} (pid {pid}) did not stop within {timeout:.0f}s: SIGKILL")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _wait_gone(pid, started, 5)


# -- the daemon we start ------------------------------------------------------------

class Daemon:
    """A dockerd this script started (and the containerd it started, if any)."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: str) -> None:
        self.proc = proc
        self.log_path = log_path
        self.containerd: list[tuple[int, str]] = []

    def note_children(self) -> None:
        for child in _children(self.proc.pid, "containerd"):
            if child not in self.containerd:
                self.containerd.append(child)

    def stop(self) -> None:
        self.note_children()
        if self.proc.poll() is None:
            say(f"stopping dockerd (pid {self.proc.pid})")
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                say(f"dockerd did not stop within {STOP_TIMEOUT:.0f}s: SIGKILL")
                self.proc.kill()
                self.proc.wait()
        # dockerd normally stops its own containerd; make sure of it.
        for pid, started in self.containerd:
            _stop_pid(pid, started, "containerd", STOP_TIMEOUT)


def log_tail(path: str, since: int = 0, lines: int = 40) -> str:
    """The last ``lines`` lines written to ``path`` after offset ``since``."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(since, handle.tell() - 16384))
            text = handle.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def wait_for_ping(timeout: float, proc: subprocess.Popen[bytes] | None = None) -> str | None:
    """None once the daemon answers; else why it did not within ``timeout``."""
    start = time.monotonic()
    next_report = start + PROGRESS_EVERY
    why = ping()
    while why is not None:
        now = time.monotonic()
        if proc is not None and proc.poll() is not None:
            return f"dockerd exited with status {proc.returncode}"
        if now - start >= timeout:
            return f"no answer after {timeout:.0f}s ({why})"
        if now >= next_report:
            say(f"waiting for the Docker daemon ({now - start:.0f}s): {why}")
            next_report += PROGRESS_EVERY
        time.sleep(0.25)
        why = ping()
    return None


def other_dockerd_starting() -> int | None:
    """The pid of a dockerd someone else started that is not answering yet."""
    try:
        with open(PIDFILE) as handle:
            pid = int(handle.read().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    if pid and (_stat(pid) or ("",))[0] == "dockerd":
        return pid
    others = running_dockerds()
    return others[0] if others else None


class CannotStart(Exception):
    """dockerd cannot exist here (no binary, not root)."""


class StartFailed(Exception):
    """dockerd was started but never answered."""


def ensure_daemon(timeout: float = START_TIMEOUT) -> Daemon | None:
    """Make the daemon answer; return the Daemon if this call started it."""
    why = ping()
    if why is None:
        say(f"a Docker daemon already answers on {socket_path()}")
        return None
    other = other_dockerd_starting()
    if other is not None:
        say(f"dockerd (pid {other}, not ours) is running but {why}; waiting for it")
        failure = wait_for_ping(timeout)
        if failure is not None:
            raise StartFailed(f"the running dockerd (pid {other}) does not answer: {failure}")
        return None
    dockerd = find_dockerd()
    if dockerd is None:
        raise CannotStart(f"{why}, and no dockerd binary is installed (Debian/Ubuntu: "
                          "apt-get install docker.io)")
    if os.geteuid() != 0:
        raise CannotStart(f"{why}, and starting {dockerd} needs root")
    log_path = os.path.join(tempfile.gettempdir(), LOG_NAME)
    say(f"{why}; starting {dockerd} (log: {log_path})")
    started = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"\n--- with_dockerd.py starting {dockerd} at {time.ctime()} ---\n".encode())
        log.flush()
        since = log.tell()
        # Its own session: a Ctrl-C meant for CMD must not kill the daemon
        # before CMD has finished with it; we stop it ourselves, in order.
        proc = subprocess.Popen([dockerd], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    daemon = Daemon(proc, log_path)
    try:
        failure = wait_for_ping(timeout, proc)
        daemon.note_children()
    except BaseException:
        daemon.stop()
        raise
    if failure is not None:
        daemon.stop()
        raise StartFailed(f"dockerd did not come up: {failure}\n--- last lines of "
                          f"{log_path} ---\n{log_tail(log_path, since) or '(empty)'}")
    say(f"dockerd (pid {proc.pid}) answers after {time.monotonic() - started:.1f}s")
    return daemon


class _Terminated(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_sigterm(signum: int, _frame: object) -> None:
    raise _Terminated(signum)


def run_command(argv: list[str]) -> int:
    try:
        proc = subprocess.Popen(argv)
    except OSError as exc:
        say(f"cannot run {argv[0]}: {exc}")
        return 127
    try:
        code = proc.wait()
    except BaseException:
        # Interrupted: CMD shares our terminal (it saw the Ctrl-C too); SIGTERM
        # is ours alone, so pass it on. Then wait, briefly, before the daemon goes.
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise
    return 128 - code if code < 0 else code


def status() -> int:
    why = ping()
    print(f"socket: {socket_path()}")
    print(f"daemon: {'answers /_ping' if why is None else why}")
    print(f"dockerd binary: {find_dockerd() or 'not installed'}")
    pids = running_dockerds()
    print(f"dockerd processes: {', '.join(map(str, pids)) if pids else 'none'}")
    print(f"log (when started by this script): {os.path.join(tempfile.gettempdir(), LOG_NAME)}")
    return 0 if why is None else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run CMD with a Docker daemon reachable; stop only what was started.",
        usage="%(prog)s [--start-only | --status] [-- CMD ARGS...]")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--start-only", action="store_true",
                       help="start dockerd if nothing answers, and leave it running")
    group.add_argument("--status", action="store_true", help="say whether a daemon answers")
    parser.add_argument("--timeout", type=float, default=START_TIMEOUT, metavar="SECONDS",
                        help=f"how long to wait for dockerd (default {START_TIMEOUT:.0f})")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.status:
        return status()
    if not args.start_only and not command:
        parser.error("give a command after --, or --start-only / --status")
    if args.start_only and command:
        parser.error("--start-only takes no command")

    signal.signal(signal.SIGTERM, _on_sigterm)
    daemon = None
    try:
        try:
            daemon = ensure_daemon(args.timeout)
        except CannotStart as exc:
            say(f"no Docker daemon here: {exc}")
            if args.start_only:
                return 1
            say("running the command anyway (Docker tests will report or skip themselves)")
        except StartFailed as exc:
            say(str(exc))
            return 1
        if args.start_only:
            if daemon is not None:
                say(f"leaving dockerd (pid {daemon.proc.pid}) running; log: {daemon.log_path}")
                daemon = None  # not ours to stop any more
            return 0
        return run_command(command)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except _Terminated as exc:
        say(f"terminated by signal {exc.signum}")
        return 128 + exc.signum
    finally:
        if daemon is not None:
            # Stopping must not be cut short by a second SIGTERM/Ctrl-C.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            daemon.stop()


if __name__ == "__main__":
    sys.exit(main())
