"""Run commands under gVisor by calling ``runsc`` directly with an OCI bundle.

Works wherever runsc can start a sandbox: a Linux host as root, an ordinary
user (user namespaces, ``newuidmap``), or a container/pod with enough
privilege. Each command gets its own sandbox (``runsc run``), with a small
init as PID 1 (``sandboxed/sandbox_init.py``) that proves when the command started and
records exactly how it ended.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence

from ..changes import start_stamp
from ..detect import POD_GVISOR_NOTE, inside_gvisor
from ..egress.policy import Blocked
from ..egress.sandbox import SandboxNetwork
from ..errors import CommandInterrupted, SandboxStartError
from ..install import command as install_command
from ..memory import OOM_RETURNCODE, MemoryGuard, mechanism
from ..process import Outcome, OutputCallback, kill_processes_mentioning, supervise
from ..registry import Enforcement
from ..request import CommandRequest
from ..result import CommandResult, returncode_of
from ..run_dirs import make_run_dir
from ..writes import Writes, take_held_writes, with_writes
from .base import BackendStatus
from .init import init_argv, read_attempts, read_status, started_in
from .layout import (
    LAYER_CAPABILITIES,
    Identity,
    build_layout,
    caller_identity,
    init_python,
    layer_setting,
)
from .oci import Bundle

log = logging.getLogger("gvisor_magic")

ENV_RUNSC = "GVISOR_MAGIC_RUNSC"
ENV_RUNSC_FLAGS = "GVISOR_MAGIC_RUNSC_FLAGS"
ENV_STATE_DIR = "GVISOR_MAGIC_STATE_DIR"
INSTALL_HINT = f"install runsc: {install_command()}"
# Debian bookworm's own runsc (20221219) fails `ls /` (statx EINVAL); backports' 20240729 works.
MIN_RELEASE = 20230601

_RELEASE = re.compile(r"(?:~|release-)(\d{8})")


def locate_runsc() -> str | None:
    """``$GVISOR_MAGIC_RUNSC`` if set (even if broken: the user asked for it), else PATH."""
    configured = os.environ.get(ENV_RUNSC)
    if configured:
        return configured
    found = shutil.which("runsc")
    if found:
        return found
    for candidate in ("/usr/local/bin/runsc", "/usr/bin/runsc"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def runsc_version(runsc: str) -> tuple[str | None, str | None]:
    """(version line, error) from ``runsc --version``."""
    try:
        done = subprocess.run([runsc, "--version"], capture_output=True, text=True, timeout=10,
                              stdin=subprocess.DEVNULL, env=runsc_env())
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"cannot run {runsc}: {exc}"
    line = (done.stdout or "").strip().splitlines()[:1]
    if done.returncode != 0 or not line:
        detail = (done.stderr or done.stdout or "").strip()[:200]
        return None, f"{runsc} --version failed (exit {done.returncode}): {detail}"
    return line[0], None


def release_date(version: str) -> int | None:
    match = _RELEASE.search(version)
    return int(match.group(1)) if match else None


def state_fix(base: str, exc: OSError) -> str:
    """What to do when the sandbox's state dir ``base`` failed us with ``exc``."""
    if exc.errno == errno.ENOSPC:
        return f"{base} is full: free space there, or point {ENV_STATE_DIR} at another directory"
    if _noexec(base):
        return (f"{base} is mounted noexec: point {ENV_STATE_DIR} at a directory on a "
                "filesystem mounted without noexec")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{base} is not writable here: point {ENV_STATE_DIR} at a writable directory"
    return f"point {ENV_STATE_DIR} at a writable directory on a local filesystem"


def explain_failure(text: str, state_dir: str | None = None) -> tuple[str, str | None]:
    """Turn runsc's start-up error into (reason, fix)."""
    text = text.strip()
    last = text.splitlines()[-1] if text else "runsc exited without a message"
    lower = text.lower()
    if state_dir and _noexec(state_dir) and ("permission denied" in lower
                                             or "operation not permitted" in lower):
        # (``state_dir`` is given only for an ordinary user: root is not held by noexec.)
        return last, (f"the sandbox state dir {state_dir} is mounted noexec, which runsc "
                      f"cannot use: point {ENV_STATE_DIR} at a directory on a filesystem "
                      "mounted without noexec")
    if "no space left" in lower:
        return last, (f"the disk holding the sandbox state ({state_dir or 'the temporary dir'}) "
                      f"is full: free space there, or point {ENV_STATE_DIR} at another "
                      "directory")
    if inside_gvisor():
        return last, (f"none needed: {POD_GVISOR_NOTE}. For a sandbox per command, run "
                      "ordinary pods with runsc in the image (see docs/deploy.md)")
    if "newuidmap" in lower or "newgidmap" in lower:
        return last, ("newuidmap/newgidmap map this user's subordinate range (/etc/subuid): "
                      "install the 'uidmap' package, and check that the user has a passwd "
                      "entry and a range (without a range, nothing needs installing)")
    if "cgroup" in lower and ("read-only" in lower or "permission" in lower):
        return last, ("runsc cannot set up cgroups here; add '--ignore-cgroups' via "
                      f"{ENV_RUNSC_FLAGS} or run with more privilege")
    if "operation not permitted" in lower or "permission denied" in lower:
        return last, ("runsc lacks privileges here (in a container it needs CAP_SYS_ADMIN, "
                      "CAP_SYS_PTRACE and seccomp/apparmor unconfined, or a gVisor RuntimeClass)")
    if "client sync file" in lower or "waiting for sandbox to start" in lower:
        return last, ("the sandbox process died while starting; to see why, run with "
                      f"{ENV_RUNSC_FLAGS}='--debug --debug-log=/tmp/runsc/' and read the "
                      "*.gofer.txt / *.boot.txt logs")
    return last, None


def state_base(rootless: bool) -> tuple[str | None, str]:
    """Where to put sandbox state and bundles: (directory or None, why).

    Inside a user namespace runsc's gofer remounts the bundle's rootfs and cannot
    keep a locked ``noexec`` flag of the filesystem under it (EPERM; Docker's
    ``--tmpfs`` default is noexec), so an ordinary user needs a directory on a
    filesystem mounted without ``noexec``. ``$GVISOR_MAGIC_STATE_DIR`` wins.
    """
    configured = os.environ.get(ENV_STATE_DIR)
    if configured:
        return configured, f"{ENV_STATE_DIR} is set"
    default = tempfile.gettempdir()
    if not rootless or not _noexec(default):
        return default, "the temporary directory"
    candidates = [os.environ.get("XDG_RUNTIME_DIR", ""),
                  os.path.join(os.path.expanduser("~"), ".cache", "gvisor-magic"), "/var/tmp"]
    for candidate in filter(None, candidates):
        try:
            os.makedirs(candidate, mode=0o700, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK | os.X_OK) and not _noexec(candidate):
            return candidate, f"{default} is mounted noexec"
    return None, (f"{default} is mounted noexec, which runsc cannot use inside a user "
                  "namespace, and no other writable exec-mounted directory was found")


def _noexec(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_NOEXEC)
    except OSError:
        return False


def runsc_env(shims: str | None = None) -> dict[str, str]:
    # runsc needs none of the caller's variables; keep tokens away from it too.
    path = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    return {"PATH": f"{shims}:{path}" if shims else path}


# runsc runs newuidmap/newgidmap for every user namespace it makes as an ordinary user,
# even to map the caller onto itself, and newuidmap refuses a uid with no passwd entry
# (OpenShift, many Kubernetes pods run as arbitrary uids): seen here with 20240729. Mapping
# only oneself needs no helper, so for that case these stand-ins write the map directly.
_IDMAP_SHIMS = {
    "newuidmap": '#!/bin/sh\n# newuidmap PID INSIDE OUTSIDE COUNT (one line: the caller itself)\n'
                 'echo "$2 $3 $4" > "/proc/$1/uid_map"\n',
    "newgidmap": '#!/bin/sh\necho deny > "/proc/$1/setgroups" 2>/dev/null\n'
                 'echo "$2 $3 $4" > "/proc/$1/gid_map"\n',
}


def idmap_shims(run_dir: str, identity: Identity) -> str | None:
    """A directory of newuidmap/newgidmap stand-ins when the caller maps only itself."""
    if not identity.rootless or len(identity.uid_mappings) != 1:
        return None  # root, or a subordinate range: the real helpers are needed
    directory = os.path.join(run_dir, "idmap")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for name, text in _IDMAP_SHIMS.items():
        path = os.path.join(directory, name)
        with open(path, "w") as handle:
            handle.write(text)
        os.chmod(path, 0o700)
    return directory


class RunscBackend:
    """gVisor via ``runsc run`` on a bundle we build: one sandbox per command."""

    name = "runsc"
    isolated = True

    def __init__(self, runsc: str | None = None, extra_flags: list[str] | None = None) -> None:
        self._runsc = runsc
        if extra_flags is None:
            extra_flags = shlex.split(os.environ.get(ENV_RUNSC_FLAGS, ""))
        self.extra_flags = extra_flags

    @property
    def runsc(self) -> str | None:
        return self._runsc or locate_runsc()

    @staticmethod
    def enforcement() -> Enforcement:
        guard = mechanism()
        memory = (
            "a memory cgroup made for each sandbox below this process's own (the host "
            "kernel OOM-kills the sandbox or the process that crosses it)"
            if guard == "host cgroup" else
            "a watchdog (no writable cgroup here) samples the sandbox's memory every 0.1 s "
            "and kills the sandbox when a sample is over the limit; memory allocated and "
            "freed between two samples is not seen, and the kill comes after the sample that "
            "crossed the limit (SECURITY.md has the overshoot measured)")
        return Enforcement(
            memory=guard, cpus="NOT enforced on runsc",
            summary="processes, open files, file size and address space are rlimits enforced "
                    "by gVisor's own kernel (no host cgroups needed, so they hold in an "
                    "unprivileged pod); /tmp and HOME are size-capped in-memory tmpfs; "
                    f"memory: {memory}; cpus: NOT enforced (the timeout bounds CPU time)",
            network="off by default (--network=none); allowlists and network=True through the "
                    "host's filtering proxy, reached only over one socket given to the "
                    "sandbox's init (runsc run --pass-fd; no host Unix socket is reachable "
                    "by path, no --host-uds=open); 'host': the host's network, unfiltered")

    def flags(self, state_dir: str, network: SandboxNetwork, *, sockets: bool = False
              ) -> list[str]:
        # --directfs=false: with directfs, runsc 20240729 truncates a host file on
        # a *read-only* bind mount when the sandbox opens it with O_TRUNC (the
        # open itself then fails with EROFS). Through the gofer, read-only holds.
        # --oci-seccomp: apply the bundle's filter, which refuses set-ID file modes.
        # No --host-uds=open, whatever the network: it would let the sandbox connect to
        # every host socket on every bind mount (seen here 2026-12-07: one in the working
        # dir). A proxied network reaches its proxy over a socket runsc passes to the
        # init instead (SandboxNetwork.run_args).
        # --host-uds=create (a kernel_dir only): the sandbox may create sockets on its
        # read-write mounts, which the host connects to (a gVisor kernel's ZMQ sockets);
        # connecting to one the host made stays refused.
        host_uds = ["--host-uds=create"] if sockets else []
        flags = ["--root", state_dir, f"--network={network.runsc_network}",
                 *host_uds, "--overlay2=none", "--directfs=false", "--oci-seccomp"]
        if "--ignore-cgroups" not in self.extra_flags and "--rootless" not in self.extra_flags:
            # Limits are rlimits enforced by gVisor itself, so no host cgroup is needed.
            flags.append("--ignore-cgroups")
        return flags + self.extra_flags

    # -- probing --------------------------------------------------------------

    def probe(self) -> BackendStatus:
        runsc = self.runsc
        if runsc is None:
            return BackendStatus(self.name, False, True, "runsc not found on PATH",
                                 fix=INSTALL_HINT)
        version, error = runsc_version(runsc)
        details = {"path": runsc}
        if version is None:
            return BackendStatus(self.name, False, True, error or "runsc is not runnable",
                                 fix=INSTALL_HINT, details=details)
        released = release_date(version)
        if released is not None and released < MIN_RELEASE:
            return BackendStatus(
                self.name, False, True,
                f"{version} is too old (before {MIN_RELEASE}: coreutils fail inside it)",
                fix=INSTALL_HINT, version=version, details=details)
        request = CommandRequest.build(
            [init_python(), "-I", "-S", "-c", "import os; print(os.uname().release)"],
            timeout=60)
        try:
            result = self.run(request)
        except SandboxStartError as exc:
            return BackendStatus(self.name, False, True, f"sandbox failed to start: {exc.reason}",
                                 fix=exc.fix, version=version, details=details)
        if not result.success:
            return BackendStatus(
                self.name, False, True,
                f"probe command failed in the sandbox (exit {result.returncode}): "
                f"{result.stderr.strip()[-300:]}", version=version, details=details)
        details["sandbox_kernel"] = result.stdout.strip()
        details["identity"] = "rootless" if caller_identity().rootless else "root"
        return BackendStatus(self.name, True, True, "a probe command ran in a gVisor sandbox",
                             version=version, details=details)

    # -- running --------------------------------------------------------------

    def run(self, request: CommandRequest, on_output: OutputCallback | None = None
            ) -> CommandResult:
        runsc = self.runsc
        if runsc is None:
            raise SandboxStartError(self.name, "runsc not found on PATH", fix=INSTALL_HINT)
        identity = caller_identity()
        base, why = state_base(identity.rootless)
        if base is None:
            raise SandboxStartError(self.name, why, fix=f"set {ENV_STATE_DIR} to a writable "
                                    "directory on a filesystem mounted without noexec")
        sandbox_id = f"gvisor-magic-{secrets.token_hex(6)}"
        marker = f"[gvisor-magic:start:{secrets.token_hex(8)}]"
        try:
            run_dir = make_run_dir(base)
        except OSError as exc:
            raise SandboxStartError(self.name, f"cannot create sandbox state in {base} ({why}): "
                                    f"{exc}", fix=f"point {ENV_STATE_DIR} at a writable "
                                    "directory") from exc
        state = os.path.join(run_dir, "state")
        status_dir = os.path.join(run_dir, "status")
        network = SandboxNetwork(request.network, run_dir, sandbox_id)
        flags = self.flags(state, network, sockets=request.spec.kernel_dir is not None)
        outcome: Outcome | None = None
        proc: subprocess.Popen[bytes] | None = None
        status, started, tried = "", False, ""
        layout = None
        guard: MemoryGuard | None = None
        layer = layer_setting(request.spec, identity)
        writes: Writes | None = None
        started_ns = start_stamp()
        try:
            try:
                os.mkdir(state, 0o700)
                os.mkdir(status_dir, 0o700)
                network.start()
                layout = build_layout(request.spec, request.env, identity, run_dir,
                                      status_dir=status_dir)
                # Held writes: the init starts as root of the sandbox to mount the layer.
                bundle = Bundle(os.path.join(run_dir, "bundle"), layout,
                                init_argv(marker, request.argv, request.timeout,
                                          network.relay_setting(), layer),
                                request.limits, network.runsc_network == "host",
                                LAYER_CAPABILITIES if layer else (),
                                init_uid=0 if layer else None)
                bundle.write()
            except OSError as exc:  # e.g. a full disk: the command has not started
                raise SandboxStartError(self.name, f"cannot write the sandbox bundle in {base} "
                                        f"({why}): {exc}", fix=state_fix(base, exc)) from exc
            log.debug("gvisor: starting sandbox %s for %r", sandbox_id, request.display)
            guard = MemoryGuard(request.limits.memory,
                                kill=lambda: self._kill(runsc, flags, sandbox_id, proc))
            try:
                proc = subprocess.Popen(
                    guard.wrap([runsc, *flags, "run", *network.run_args(), "--bundle",
                                bundle.path, sandbox_id]),
                    stdin=subprocess.PIPE if request.stdin is not None else subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=network.pass_fds,
                    start_new_session=True, env=runsc_env(idmap_shims(run_dir, identity)))
            except OSError as exc:
                raise SandboxStartError(self.name, f"cannot execute {runsc}: {exc}",
                                        fix=INSTALL_HINT) from exc
            finally:
                network.sandbox_started()
            guard.watch(proc.pid)
            outcome = supervise(
                proc, kill=lambda: self._kill(runsc, flags, sandbox_id, proc),
                stdin=request.stdin, timeout=request.timeout, on_output=on_output,
                max_output=request.max_output, stderr_gate=marker.encode())
        finally:
            # Nothing to delete if runsc never ran; everything to check if it ended oddly.
            abnormal = proc is not None and (
                outcome is None or outcome.timed_out or outcome.interrupted
                or not outcome.gate_seen or outcome.returncode >= 128)
            network.close()
            take = None
            if layer:
                def take(status_dir: str) -> None:
                    # Not completed: killed (a signal, its timeout, an interrupt, its
                    # memory limit) or never started. An exit status >= 128 of its own is
                    # completed (git exits 128): the init writes "exit N" for it.
                    nonlocal writes
                    # The init's start file, not the stderr gate (noise can hide it).
                    completed = (outcome is not None and started_in(status_dir)
                                 and not (outcome.timed_out or outcome.interrupted)
                                 and not (guard is not None and guard.breached())
                                 and not read_status(os.path.join(status_dir, "status"))
                                 .startswith("signal"))
                    writes = take_held_writes(request.spec, status_dir, started_ns,
                                              completed=completed)
            status, started, tried = self._cleanup(runsc, flags, sandbox_id, state, run_dir,
                                                   abnormal, take)
            if layout is not None:
                layout.release()
            if guard is not None:
                guard.close()
        blocked = network.blocked(relay_text=tried)
        if guard is not None and guard.breached():
            return with_writes(self._memory_killed(request, outcome, guard, sandbox_id, layout,
                                                   blocked), writes)
        try:
            # noexec matters only inside a user namespace (see state_base).
            result = self._result(request, outcome, status, sandbox_id, started,
                                  marker.encode(), base if identity.rootless else None,
                                  blocked)
        except CommandInterrupted as exc:
            exc.result.details.update(layout.details())
            exc.result = with_writes(exc.result, writes)
            raise
        result.details.update(layout.details())
        return with_writes(result, writes)

    def _memory_killed(self, request: CommandRequest, outcome: Outcome, guard: MemoryGuard,
                       sandbox_id: str, layout, blocked: list[Blocked]) -> CommandResult:
        """The sandbox crossed ``Limits.memory`` and was killed (even before the command
        started: that is this command's error, never a reason to try another backend)."""
        details = {"sandbox_id": sandbox_id, "memory_limit": guard.describe_breach(),
                   "memory_peak": f"{guard.peak_bytes() >> 20} MiB", **layout.details()}
        result = CommandResult.from_streams(
            outcome.stdout, outcome.stderr, returncode=OOM_RETURNCODE, backend=self.name,
            isolated=True, duration=outcome.duration, network=request.network,
            details=details, error=guard.describe_breach(), blocked=blocked)
        if outcome.interrupted:
            raise CommandInterrupted(result)
        return result

    def _result(self, request: CommandRequest, outcome: Outcome, status: str,
                sandbox_id: str, started: bool = False, marker: bytes = b"",
                state_dir: str | None = None, blocked: Sequence[Blocked] = ()
                ) -> CommandResult:
        if not outcome.gate_seen and started:
            # The command may have run, whatever came first on stderr (a wrapper's line,
            # runsc's --debug-log=/dev/stderr): report it, never try elsewhere.
            outcome.stderr.add(outcome.pre_gate.replace(marker, b"", 1))
        elif not outcome.gate_seen:
            message = outcome.pre_gate.decode("utf-8", "replace").strip()
            if outcome.interrupted:
                raise KeyboardInterrupt
            if outcome.timed_out:
                message = f"sandbox did not start within {request.timeout}s. {message}"
            message = message or f"runsc exited {outcome.returncode} before the command started"
            reason, fix = explain_failure(message, state_dir)
            raise SandboxStartError(self.name, reason, fix=fix)
        returncode = returncode_of(outcome.returncode, init_status=status,
                                   timed_out=outcome.timed_out, interrupted=outcome.interrupted)
        details = {"sandbox_id": sandbox_id}
        error = None
        if returncode >= 128 and not status and not outcome.timed_out:
            # The init reports every status >= 128; without a report, the
            # sandbox itself ended (crashed or was killed) under the command.
            error = (f"the sandbox ended (runsc exit {returncode}) before the command "
                     "reported its status")
        result = CommandResult.from_streams(
            outcome.stdout, outcome.stderr, returncode=returncode, backend=self.name,
            isolated=True, timed_out=outcome.timed_out, duration=outcome.duration,
            network=request.network, details=details, error=error, blocked=blocked)
        if outcome.interrupted:
            raise CommandInterrupted(result)
        return result

    def _kill(self, runsc: str, flags: list[str], sandbox_id: str,
              proc: subprocess.Popen[bytes]) -> None:
        """Kill every process in the sandbox; the sandbox then ends ``runsc run``."""
        log.info("gvisor: killing sandbox %s", sandbox_id)
        try:
            killed = subprocess.run([runsc, *flags, "kill", "--all", sandbox_id, "KILL"],
                                    capture_output=True, timeout=15, env=runsc_env(),
                                    stdin=subprocess.DEVNULL).returncode == 0
        except (OSError, subprocess.SubprocessError):
            killed = False  # runsc itself hangs (its gofer was killed, say): go around it
        if not killed:
            # Not created yet, or already gone: take down runsc and its children.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, 9)
            kill_processes_mentioning(sandbox_id, "sandbox")

    def _cleanup(self, runsc: str, flags: list[str], sandbox_id: str, state: str,
                 run_dir: str, abnormal: bool,
                 take: Callable[[str], None] | None = None) -> tuple[str, bool, str]:
        """Remove the sandbox, its processes and files; return the init's status report,
        whether the init recorded the command's start, and what its relay says was tried
        while the network was off. ``take`` is given the status dir once the sandbox is
        gone, before it is removed (the held writes the init copied out there).

        The status file is written by code inside the sandbox, so it is read
        with a size bound and only trusted to refine ``128 + N`` into a signal.
        """
        status = read_status(os.path.join(run_dir, "status", "status"))
        started = started_in(os.path.join(run_dir, "status"))
        tried = read_attempts(os.path.join(run_dir, "status"))
        # `runsc run` removes a sandbox whose init exited and leaves its state dir
        # empty; anything else (a kill, a crash, a start-up failure) gets the
        # full treatment: delete, then hunt for stray runsc processes.
        leftover = os.path.isdir(state) and bool(os.listdir(state))
        if leftover or abnormal:
            try:
                subprocess.run([runsc, *flags, "delete", "--force", sandbox_id],
                               capture_output=True, timeout=30, env=runsc_env(),
                               stdin=subprocess.DEVNULL)
            except (OSError, subprocess.SubprocessError) as exc:
                log.warning("gvisor: runsc delete failed for %s: %s", sandbox_id, exc)
            kill_processes_mentioning(sandbox_id, "sandbox")
        if take is not None:
            take(os.path.join(run_dir, "status"))
        shutil.rmtree(run_dir, ignore_errors=True)
        if os.path.exists(run_dir):
            log.warning("gvisor: could not remove the sandbox directory %s", run_dir)
        return status, started, tried


