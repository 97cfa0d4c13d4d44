"""The unisolated fallback: a plain host process, honest about it, but still careful.

Used on macOS/Windows, or where gVisor cannot run. It cannot keep a command
away from the user's files or network, and every result says so
(``isolated=False``). What it can do, it does: a scrubbed environment, empty
stdin, its own process group killed as a whole, rlimits on processes, memory
and file size (a fork bomb that escaped a timeout once took every pid on a
test machine), and nothing left running afterwards: on Linux the command runs
under a subreaper of ours (``reaper.py``), which also catches what left the
process group or was re-parented, and ends with its caller; and, where this
process can make one, in a cgroup of its own (``_RunCgroup``), which is killed
as a whole when the command ends. What could not be killed is said in the
result's ``error``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
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
#: Seconds the end of a command may take to kill what it left (the reaper's own bound is 5).
KILL_BOUND = 10.0
log = logging.getLogger("gvisor_magic")


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
        cgroup = _RunCgroup.make() if _LINUX else None
        report_r = report_w = -1
        if _LINUX:
            # Under a subreaper of ours, so that no descendant escapes (see reaper.py); it
            # says on the report pipe what it could not kill.
            report_r, report_w = os.pipe()
            argv = [sys.executable, "-I", "-S", "-c", _REAPER_SOURCE,
                    f"{0.0 if request.timeout is None else request.timeout + 5.0:.3f}",
                    str(os.getpid()), str(report_w), *argv]
        try:
            proc = subprocess.Popen(
                argv, cwd=request.working_dir, env=env,
                stdin=subprocess.PIPE if request.stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=_POSIX, pass_fds=(report_w,) if report_w >= 0 else (),
                preexec_fn=_child_setup(request, cgroup) if _POSIX else None)
        except FileNotFoundError:
            _close(report_r, report_w, cgroup)
            # Like a shell: an unknown program is a result (127), not an exception.
            return self._no_program(request, 127, f"{request.argv[0]}: command not found\n")
        except PermissionError as exc:
            _close(report_r, report_w, cgroup)
            return self._no_program(request, 126, f"{request.argv[0]}: {exc.strerror}\n")
        except OSError as exc:
            _close(report_r, report_w, cgroup)
            raise SandboxStartError(self.name, f"cannot start {request.argv[0]!r}: {exc}") from exc
        except BaseException:
            _close(report_r, report_w, cgroup)
            raise
        if report_w >= 0:
            os.close(report_w)
        if cgroup is not None and not cgroup.holds(proc.pid):
            cgroup.remove()  # the child could not join it: the reaper alone ends the tree
            cgroup = None
        tracked = _Tree(proc.pid, cgroup, report_r)
        try:
            outcome = supervise(
                proc, kill=tracked.kill, on_exit=tracked.kill, stdin=request.stdin,
                timeout=request.timeout, on_output=on_output, max_output=request.max_output)
        finally:
            tracked.kill()
            tracked.close()
        returncode = returncode_of(outcome.returncode, timed_out=outcome.timed_out)
        result = CommandResult.from_streams(
            outcome.stdout, outcome.stderr, returncode=returncode, backend=self.name,
            isolated=False, timed_out=outcome.timed_out, duration=outcome.duration,
            network=HOST_NETWORK, error=tracked.left_running())
        if outcome.interrupted:
            raise CommandInterrupted(result)
        return result

    def _no_program(self, request: CommandRequest, code: int, message: str) -> CommandResult:
        return CommandResult(returncode=code, stdout="", stderr=message, backend=self.name,
                             isolated=False, **network_fields(HOST_NETWORK))


class _Tree:
    """The command's process group, its cgroup (if any), and every descendant we have seen.

    ``setsid`` lets a child leave the process group, so descendants are also
    remembered (via psutil) while the command runs and killed individually.
    """

    def __init__(self, pid: int, cgroup: _RunCgroup | None = None, report: int = -1) -> None:
        self.pid = pid
        self.cgroup = cgroup
        self.known: dict[int, psutil.Process] = {}
        self.survivors: set[int] = set()
        self._report = report
        self._reported = b""
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
            # The reaper kills everything below it (orphans included) on SIGTERM; psutil
            # checks the create time, so a reused pid is never hit once it was reaped.
            reaper = self.known.get(self.pid)
            with contextlib.suppress(psutil.Error):
                if reaper is not None and reaper.is_running():
                    reaper.send_signal(signal.SIGTERM)
                    reaper.wait(timeout=KILL_BOUND)
        if _POSIX:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        if self.cgroup is not None:
            # Complete: whatever the command started is in it, however it left the tree.
            self.survivors.update(self.cgroup.kill(KILL_BOUND))
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

    def close(self) -> None:
        """Read the reaper's report and remove the cgroup (once it is empty)."""
        if self._report >= 0:
            with contextlib.suppress(OSError):
                os.set_blocking(self._report, False)
                while chunk := os.read(self._report, 65536):
                    self._reported += chunk
            os.close(self._report)
            self._report = -1
        line = self._reported.decode(errors="replace").strip().split()
        if line[:1] == ["left"]:
            self.survivors.update(int(pid) for pid in line[1:] if pid.isdigit())
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None

    def left_running(self) -> str | None:
        """The result's ``error`` when something the command started could not be killed."""
        alive = sorted(pid for pid in self.survivors if _alive(pid))
        if not alive:
            return None
        shown = " ".join(map(str, alive[:20])) + (" ..." if len(alive) > 20 else "")
        log.warning("gvisor: %d host processes of an unisolated command could not be "
                    "killed: %s", len(alive), shown)
        return (f"{len(alive)} processes the command started on the host could not be "
                f"killed within {KILL_BOUND:g} s and may still be running (pids {shown})")


def _alive(pid: int) -> bool:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    return False


def _close(report_r: int, report_w: int, cgroup: _RunCgroup | None) -> None:
    for fd in (report_r, report_w):
        if fd >= 0:
            os.close(fd)
    if cgroup is not None:
        cgroup.remove()


class _RunCgroup:
    """A cgroup holding one command and all it starts, made where this process may.

    The child joins it between fork and exec; its descendants cannot leave it (moving a
    process needs write access to a common ancestor, which an ordinary user does not
    have here). At the end it is killed as a whole: cgroup v2 ``cgroup.kill`` where the
    kernel has it (5.14+), else frozen (v2 ``cgroup.freeze``, the v1 ``freezer``), every
    pid in ``cgroup.procs`` SIGKILLed and thawed, until it is empty; then removed.
    Tried in order: the unified (v2) hierarchy, the v1 freezer, then the v1 pids
    hierarchy (no freezing: the kill repeats until nothing is left). An ordinary user
    usually can make none (then the reaper alone ends the tree). Seen here (Debian 12,
    cgroup v1 hybrid with v2 at ``/sys/fs/cgroup/unified``, root): v2 is used.
    """

    PREFIX = "gvisor-magic-run-"

    def __init__(self, path: str, kind: str) -> None:
        self.path, self.kind = path, kind

    @classmethod
    def make(cls) -> _RunCgroup | None:
        for kind, parent in _cgroup_parents():
            _remove_orphans(parent, cls.PREFIX)
            path = os.path.join(parent, f"{cls.PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
            try:
                os.mkdir(path)
            except OSError:
                continue
            if os.access(os.path.join(path, "cgroup.procs"), os.W_OK):
                return cls(path, kind)
            with contextlib.suppress(OSError):
                os.rmdir(path)
        return None

    def join(self) -> None:
        """Move the calling process in (the child, before exec: nothing else may run)."""
        fd = os.open(os.path.join(self.path, "cgroup.procs"), os.O_WRONLY)
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)

    def pids(self) -> list[int]:
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as handle:
                return [int(pid) for pid in handle.read().split()]
        except (OSError, ValueError):
            return []

    def holds(self, pid: int) -> bool:
        return pid in self.pids()

    def _set(self, name: str, value: str) -> bool:
        try:
            with open(os.path.join(self.path, name), "w") as handle:
                handle.write(value)
            return True
        except OSError:
            return False

    def _freeze(self, frozen: bool) -> None:
        if self.kind == "v2":
            self._set("cgroup.freeze", "1" if frozen else "0")
        elif self.kind == "freezer":
            self._set("freezer.state", "FROZEN" if frozen else "THAWED")

    def kill(self, bound: float) -> list[int]:
        """Kill everything in it; the pids still there after ``bound`` seconds."""
        deadline = time.monotonic() + bound
        if self.kind == "v2":
            self._set("cgroup.kill", "1")
        pause = threading.Event()
        while (pids := self.pids()) and time.monotonic() < deadline:
            self._freeze(True)  # no fork while the pids are killed
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            self._freeze(False)  # a frozen process dies only once thawed
            pause.wait(0.005)
        return self.pids()

    def remove(self) -> None:
        """Remove it once empty (a last kill first, bounded)."""
        deadline = time.monotonic() + KILL_BOUND
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    log.warning("gvisor: could not remove the cgroup %s", self.path)
                    return
                self.kill(0.5)


def _cgroup_parents() -> list[tuple[str, str]]:
    """(kind, directory of this process's own cgroup) per usable hierarchy, best first."""
    try:
        with open("/proc/self/cgroup") as handle:
            own = [line.split(":", 2) for line in handle.read().splitlines()]
        with open("/proc/self/mountinfo") as handle:
            mounts = [line.split() for line in handle.read().splitlines()]
    except OSError:
        return []
    found = []
    for fields in mounts:
        if " - " not in " ".join(fields):
            continue
        tail = fields[fields.index("-") + 1:]
        if len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        root, point, options = fields[3], fields[4], tail[2].split(",")
        for hierarchy, controllers, path in (entry for entry in own if len(entry) == 3):
            if tail[0] == "cgroup2":
                match, kind = hierarchy == "0" and not controllers, "v2"
            else:
                names = controllers.split(",")
                match = bool(names) and names[0] != "" and all(n in options for n in names)
                kind = "freezer" if "freezer" in names else "v1" if "pids" in names else ""
            if not match or not kind:
                continue
            if root != "/" and path.startswith(root):
                path = path[len(root):]
            directory = os.path.join(point, path.lstrip("/"))
            if os.path.isdir(directory) and os.access(directory, os.W_OK):
                found.append((kind, directory))
    order = {"v2": 0, "freezer": 1, "v1": 2}
    return sorted(dict.fromkeys(found), key=lambda item: order[item[0]])


def _remove_orphans(parent: str, prefix: str) -> None:
    """Remove cgroups of ours whose process died without removing them (SIGKILL)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(parent):
            owner = name[len(prefix):].split("-")[0] if name.startswith(prefix) else ""
            if owner.isdigit() and not psutil.pid_exists(int(owner)):
                leftover = _RunCgroup(os.path.join(parent, name), "")
                leftover.kill(1.0)
                with contextlib.suppress(OSError):
                    os.rmdir(leftover.path)


def _child_setup(request: CommandRequest, cgroup: _RunCgroup | None):
    """What the child does between fork and exec: its rlimits, then joining the cgroup."""
    limits = _limits_setter(request)

    def setup() -> None:
        limits()
        if cgroup is not None:
            with contextlib.suppress(OSError):
                cgroup.join()  # the parent checks that it did

    return setup


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
