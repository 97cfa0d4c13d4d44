"""The unisolated fallback: a plain host process, honest about it, but still careful.

Used on macOS/Windows, or where gVisor cannot run. It cannot keep a command
away from the user's files or network, and every result says so
(``isolated=False``). What it can do, it does: a scrubbed environment, empty
stdin, its own process group killed as a whole, rlimits on processes, memory
and file size (a fork bomb that escaped a timeout once took every pid on a
test machine), and nothing left running afterwards: on Linux the command runs
under a subreaper of ours (``reaper.py``), which also catches what left the
process group or was re-parented, and ends with its caller.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from ..egress.policy import NetworkPolicy
from ..errors import CommandInterrupted, SandboxStartError
from ..process import OutputCallback, supervise
from ..registry import Enforcement
from ..request import CommandRequest, sandbox_env
from ..result import CommandResult, network_fields, returncode_of
from .base import BackendStatus

_POSIX = os.name == "posix"
_LINUX = sys.platform.startswith("linux")
#: What a command on the host can reach, whatever was asked: everything the host can.
HOST_NETWORK = NetworkPolicy("host")
_REAPER_SOURCE = (Path(__file__).resolve().parent / "reaper.py").read_text() if _LINUX else ""


class SubprocessBackend:
    """Runs the command directly on the host, without gVisor."""

    name = "subprocess"
    isolated = False

    @staticmethod
    def enforcement() -> Enforcement:
        return Enforcement(
            memory="NOT enforced on the host", cpus="NOT enforced on the host",
            summary="rlimits set on the host process (RLIMIT_NPROC counts all of the user's "
                    "processes and does not apply to root); no /tmp cap, memory and cpus NOT "
                    "enforced: this fallback isolates nothing",
            network="the host's whole network, whatever is asked (NOT enforced); allowlists "
                    "and network=True are refused")

    def probe(self) -> BackendStatus:
        return BackendStatus(self.name, True, False,
                             "always available; runs commands on the host WITHOUT isolation")

    def run(self, request: CommandRequest, on_output: OutputCallback | None = None
            ) -> CommandResult:
        home = os.path.expanduser("~")
        path = os.pathsep.join(dict.fromkeys([
            os.path.dirname(sys.executable),
            *os.environ.get("PATH", os.defpath).split(os.pathsep)]))
        env = sandbox_env(request.env, home=home, path=path,
                          user=os.environ.get("USER") or os.environ.get("USERNAME") or "")
        env["TMPDIR"] = tempfile.gettempdir()
        if not _POSIX:
            env.update({k: v for k, v in os.environ.items()
                        if k.upper() in ("SYSTEMROOT", "COMSPEC", "PATHEXT", "WINDIR")})
        argv = list(request.argv)
        if _LINUX:
            # Under a subreaper of ours, so that no descendant escapes (see reaper.py).
            argv = [sys.executable, "-I", "-S", "-c", _REAPER_SOURCE,
                    f"{0.0 if request.timeout is None else request.timeout + 5.0:.3f}",
                    str(os.getpid()), *argv]
        try:
            proc = subprocess.Popen(
                argv, cwd=request.working_dir, env=env,
                stdin=subprocess.PIPE if request.stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=_POSIX,
                preexec_fn=_limits_setter(request) if _POSIX else None)
        except FileNotFoundError:
            # Like a shell: an unknown program is a result (127), not an exception.
            return self._no_program(request, 127, f"{request.argv[0]}: command not found\n")
        except PermissionError as exc:
            return self._no_program(request, 126, f"{request.argv[0]}: {exc.strerror}\n")
        except OSError as exc:
            raise SandboxStartError(self.name, f"cannot start {request.argv[0]!r}: {exc}") from exc
        tracked = _Tree(proc.pid)
        outcome = supervise(
            proc, kill=tracked.kill, on_exit=tracked.kill, stdin=request.stdin,
            timeout=request.timeout, on_output=on_output, max_output=request.max_output)
        tracked.kill()
        returncode = returncode_of(outcome.returncode, timed_out=outcome.timed_out)
        result = CommandResult.from_streams(
            outcome.stdout, outcome.stderr, returncode=returncode, backend=self.name,
            isolated=False, timed_out=outcome.timed_out, duration=outcome.duration,
            network=HOST_NETWORK)
        if outcome.interrupted:
            raise CommandInterrupted(result)
        return result

    def _no_program(self, request: CommandRequest, code: int, message: str) -> CommandResult:
        return CommandResult(returncode=code, stdout="", stderr=message, backend=self.name,
                             isolated=False, **network_fields(HOST_NETWORK))


class _Tree:
    """The command's process group plus every descendant we have seen.

    ``setsid`` lets a child leave the process group, so descendants are also
    remembered (via psutil) while the command runs and killed individually.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.known: dict[int, psutil.Process] = {}
        self._remember()

    def _remember(self) -> None:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.pid)
            self.known.setdefault(self.pid, root)
            for child in root.children(recursive=True):
                self.known.setdefault(child.pid, child)

    def kill(self) -> None:
        self._remember()
        if _LINUX:
            # The reaper kills everything below it (orphans included) on SIGTERM.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGTERM)
            with contextlib.suppress(psutil.Error):
                psutil.Process(self.pid).wait(timeout=5)
        if _POSIX:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        for process in list(self.known.values()):
            with contextlib.suppress(psutil.Error):
                # psutil checks the create time, so a reused pid is never hit.
                if process.pid != self.pid and process.is_running():
                    for child in process.children(recursive=True):
                        with contextlib.suppress(psutil.Error):
                            child.kill()
                    process.kill()
        if not _POSIX:
            with contextlib.suppress(psutil.Error):
                psutil.Process(self.pid).kill()


def _limits_setter(request: CommandRequest):
    """rlimits for the child, set between fork and exec (the child's own process)."""
    import resource

    limits = []
    for name, value in request.limits.rlimits().items():
        number = getattr(resource, name, None)
        if number is None:
            continue
        if name == "RLIMIT_NPROC":
            if os.geteuid() == 0:
                continue  # the kernel does not apply it to root anyway
            # On the host this limit counts all of the user's processes, not just
            # the command's: allow the command this many on top of what exists.
            value += _user_process_count()
        limits.append((number, value))

    def apply() -> None:
        for number, value in limits:
            with contextlib.suppress(ValueError, OSError):
                _soft, hard = resource.getrlimit(number)
                cap = value if hard == resource.RLIM_INFINITY else min(value, hard)
                resource.setrlimit(number, (cap, cap))

    return apply


def _user_process_count() -> int:
    uid = os.getuid()
    count = 0
    for process in psutil.process_iter(["uids"]):
        with contextlib.suppress(psutil.Error, TypeError):
            if process.info["uids"].real == uid:
                count += 1
    return count
