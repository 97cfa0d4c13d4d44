"""Long-lived sandboxes whose PID 1 is the session agent (``sandboxed/session_agent.py``).

A transport starts one sandbox, gives the host a byte channel to the agent
(its stdin and stdout), and tears everything down on ``close``. The protocol
on top of it lives in ``gvisor_magic.agent_channel``.

Inside the sandbox that channel is a Unix socket, never a pipe: gVisor lets a
command open PID 1's pipes again through ``/proc/1/fd``, but not a socket.
``runsc run`` is given socket pairs as its stdio; Docker's are pipes, so there
the agent starts hidden below a relay (``session_agent.hide``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from ..egress.sandbox import SandboxNetwork
from ..errors import SandboxStartError
from ..memory import ContainerOOMWatch, MemoryGuard
from ..process import kill_processes_mentioning
from ..request import SandboxSpec
from ..run_dirs import make_run_dir
from .init import RELAY_SOURCE
from .layout import LAYER_CAPABILITIES, build_layout, caller_identity, init_python, layer_setting
from .oci import Bundle
from .runsc import (
    ENV_STATE_DIR,
    INSTALL_HINT,
    RunscBackend,
    idmap_shims,
    runsc_env,
    state_base,
    state_fix,
)

_SANDBOXED = Path(__file__).resolve().parent.parent / "sandboxed"
#: The agent's whole program: the relay and the wire define names only, the agent after
#: them uses them as its own (see sandboxed/agent_wire.py).
AGENT_SOURCE = "\n".join([RELAY_SOURCE, (_SANDBOXED / "agent_wire.py").read_text(),
                           (_SANDBOXED / "cow_layer.py").read_text(),
                           (_SANDBOXED / "session_agent.py").read_text()])
_STDERR_KEEP = 64 * 1024
#: How long an error waits for the end of runsc's stderr once the sandbox has ended.
STDERR_GRACE = 5.0


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """(host end, sandbox end), with buffers as large as the agent's output frames."""
    host, sandbox = socket.socketpair()
    for end in (host, sandbox):
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                end.setsockopt(socket.SOL_SOCKET, option, 1 << 20)
    return host, sandbox


def agent_argv(*extra: str) -> list[str]:
    return [init_python(), "-I", "-S", "-c", AGENT_SOURCE, *extra]


#: What the agent needs inside gVisor to take a uid of its own (``session_agent.seal``) and
#: mount /dev/mqueue (``session_agent.mount_message_queues``),
#: and the relay of a Docker session to hide it; all dropped before any command runs.
SEAL_CAPABILITIES = ("SETUID", "SETPCAP", "SYS_ADMIN")
HIDE_CAPABILITIES = ("SYS_ADMIN", "SETPCAP", "SETUID", "SETGID")


def _capabilities(base: tuple[str, ...], layer: str) -> tuple[str, ...]:
    """The agent's start-up capabilities, and the layer keeper's when writes are held."""
    return tuple(dict.fromkeys(base + (LAYER_CAPABILITIES if layer else ())))


def _status_dir(run_dir: str, spec: SandboxSpec) -> str | None:
    """Where the agent's layer keeper copies each command's writes out (``STATUS_DIR``)."""
    if not spec.holds_writes:
        return None
    path = os.path.join(run_dir, "status")
    os.mkdir(path, 0o700)
    return path


class _StderrTail:
    """Drains the sandbox's stderr (runsc's own messages) into a bounded buffer.

    A thread reads it, so what runsc wrote just before it exited may not be in ``data``
    yet when the caller learns that it exited (its channel closed): ``finish`` waits for
    the end of the stream, which comes once every process that could write to it has
    exited. ``wake`` (a socket's ``shutdown``) ends a read that would otherwise outlive
    the stream's owner, so that its fd is never read after it was closed (and reused).
    """

    def __init__(self, fd: int, wake: Callable[[], None] | None = None) -> None:
        self.data = bytearray()
        self._wake = wake
        self._thread = threading.Thread(target=self._drain, args=(fd,), daemon=True,
                                        name="gvisor-magic-stderr")
        self._thread.start()

    def _drain(self, fd: int) -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(fd, 65536):
                self.data += chunk
                del self.data[:-_STDERR_KEEP]

    def finish(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for the end of the stream; True if it came."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, timeout: float) -> None:
        """Before the stream's fd is closed: its end, or the reader woken and gone."""
        if not self.finish(timeout) and self._wake is not None:
            with contextlib.suppress(OSError):
                self._wake()
            self._thread.join(timeout)

    def text(self) -> str:
        return bytes(self.data).decode("utf-8", "replace").strip()


class RunscTransport:
    """``runsc run`` (foreground) of a bundle whose init is the agent."""

    name = "runsc"

    def __init__(self, spec: SandboxSpec, backend: RunscBackend | None = None) -> None:
        backend = backend or RunscBackend()
        runsc = backend.runsc
        if runsc is None:
            raise SandboxStartError("runsc", "runsc not found on PATH", fix=INSTALL_HINT)
        identity = caller_identity()
        base, why = state_base(identity.rootless)
        if base is None:
            raise SandboxStartError("runsc", why, fix=f"set {ENV_STATE_DIR}")
        self.sandbox_id = f"gvisor-magic-{secrets.token_hex(6)}"
        self._runsc = runsc
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: _StderrTail | None = None
        self.layout = None
        self.guard: MemoryGuard | None = None
        self.network: SandboxNetwork | None = None
        self._channel, self._errors = socket_pair(), socket_pair()
        try:
            self.run_dir = make_run_dir(base)
        except OSError as exc:
            raise SandboxStartError("runsc", f"cannot create sandbox state in {base}: {exc}",
                                    fix=f"point {ENV_STATE_DIR} at a writable directory"
                                    ) from exc
        state = os.path.join(self.run_dir, "state")
        self.network = network = SandboxNetwork(spec.network, self.run_dir, self.sandbox_id)
        self._flags = backend.flags(state, network, sockets=spec.kernel_dir is not None)
        try:
            os.mkdir(state, 0o700)
            network.start()
            self.status_dir = _status_dir(self.run_dir, spec)
            self.layout = layout = build_layout(spec, {}, identity, self.run_dir,
                                                status_dir=self.status_dir)
            self.env = layout.env
            # The agent starts as root of the sandbox and takes a uid of its own,
            # running commands as the caller (session_agent.seal).
            layer = layer_setting(spec, identity)
            bundle = Bundle(os.path.join(self.run_dir, "bundle"), layout,
                            agent_argv("--caller", str(identity.uid), "--shell", spec.shell,
                                       "--egress", network.relay_setting(), "--layer", layer),
                            spec.limits, network.runsc_network == "host",
                            _capabilities(SEAL_CAPABILITIES, layer), init_uid=0)
            bundle.write()
            self.guard = MemoryGuard(spec.limits.memory, kill=self._kill_sandbox)
            try:
                self.proc = subprocess.Popen(
                    self.guard.wrap([runsc, *self._flags, "run", *network.run_args(),
                                     "--bundle", bundle.path, self.sandbox_id]),
                    stdin=self._channel[1], stdout=self._channel[1],
                    stderr=self._errors[1], pass_fds=network.pass_fds, start_new_session=True,
                    env=runsc_env(idmap_shims(self.run_dir, identity)))
            except OSError as exc:  # a GVISOR_MAGIC_RUNSC that names nothing runnable
                raise SandboxStartError("runsc", f"cannot execute {runsc}: {exc}",
                                        fix=INSTALL_HINT) from exc
            finally:
                network.sandbox_started()  # runsc has its own copy of the channel's end
            self.guard.watch(self.proc.pid, whole_sandbox=False)
            for pair in (self._channel, self._errors):
                pair[1].close()  # runsc has them now
            errors = self._errors[0]
            self._stderr = _StderrTail(errors.fileno(),
                                       wake=lambda: errors.shutdown(socket.SHUT_RD))
        except OSError as exc:
            self.close()
            raise SandboxStartError("runsc", f"cannot start the sandbox: {exc}",
                                    fix=state_fix(base, exc)) from exc
        except BaseException:
            self.close()
            raise
        self.stdout_fd = self._channel[0].fileno()

    def send(self, data: bytes) -> None:
        self._channel[0].sendall(data)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr_text(self) -> str:
        """runsc's own messages: while the sandbox runs, those read so far; once it has
        ended or is ending (runsc exited, the agent's channel closed, or ``close``d), all
        of them, waiting up to ``STDERR_GRACE`` for the end of the stream. An error built
        on the channel's end (a runsc that failed at start) then always names runsc's own
        reason, which its stderr reader might not have read yet (seen here: "the sandbox
        agent closed its channel (no message)")."""
        if self._stderr is None:
            return ""
        if self.proc is None or self.proc.poll() is not None or self._channel_ended():
            self._stderr.finish(STDERR_GRACE)
        return self._stderr.text()

    def _channel_ended(self) -> bool:
        """Whether the agent's end of the channel is closed (the sandbox is going)."""
        try:
            return self._channel[0].recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False  # open, nothing to read
        except OSError:
            return True  # closed here

    def _kill_sandbox(self) -> None:
        """The memory watchdog's kill: the whole sandbox (the session replaces it)."""
        self._runsc_quietly("kill", "--all", self.sandbox_id, "KILL")

    def memory_events(self) -> int:
        """How often ``Limits.memory`` ended something in this sandbox so far."""
        return self.guard.memory_events() if self.guard is not None else 0

    def memory_note(self) -> str:
        return self.guard.describe_breach() if self.guard is not None else "memory limit"

    def close(self) -> None:
        """Kill the sandbox and remove its files; idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            # runsc itself may be gone or broken by now: then the wait below
            # times out and the processes are killed directly.
            killed = self._runsc_quietly("kill", "--all", self.sandbox_id, "KILL")
            try:
                self.proc.wait(timeout=10 if killed else 0.1)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=10)
        if self.proc is not None:
            state = os.path.join(self.run_dir, "state")
            if os.path.isdir(state) and os.listdir(state):
                self._runsc_quietly("delete", "--force", self.sandbox_id)
            kill_processes_mentioning(self.sandbox_id, "sandbox")
            self.proc = None
        if self._stderr is not None:
            # Everything that held the stream is gone: read it to its end (stderr_text
            # stays whole after close), and never read its fd once closed below.
            self._stderr.stop(STDERR_GRACE)
        for end in (*self._channel, *self._errors):
            end.close()
        if self.guard is not None:
            self.guard.close()
        if self.network is not None:
            self.network.close()
        _release(self)
        if getattr(self, "run_dir", None):
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _runsc_quietly(self, *args: str) -> bool:
        """Run a runsc subcommand; False if it failed or runsc itself is gone."""
        try:
            return subprocess.run([self._runsc, *self._flags, *args], capture_output=True,
                                  timeout=30, env=runsc_env(),
                                  stdin=subprocess.DEVNULL).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


class DockerTransport:
    """A container under Docker's runsc runtime whose PID 1 is the agent."""

    name = "docker"

    def __init__(self, spec: SandboxSpec, backend=None) -> None:
        from .docker import DockerBackend, docker_identity
        from .docker_process import DockerProcess

        backend = backend or DockerBackend()
        if backend.custom_image:
            raise SandboxStartError("docker", "warm sessions need the host-tools image "
                                    "(GVISOR_MAGIC_IMAGE is set)")
        runtime, config = backend.find_runtime()
        backend.check_network(spec.network, runtime, config)
        backend.check_kernel_dir(spec)
        image = backend.image()
        self.run_dir = make_run_dir(tempfile.gettempdir())
        #: Always off here (``check_network``): the agent's relay notes what was tried.
        self.network = SandboxNetwork(spec.network, self.run_dir)
        self.process = None
        self.layout = None
        self.oom: ContainerOOMWatch | None = None
        try:
            self.status_dir = _status_dir(self.run_dir, spec)
            self.layout = layout = build_layout(spec, {}, docker_identity(), self.run_dir,
                                                status_dir=self.status_dir)
            self.env = layout.env
            # Docker gives the container pipes for stdio: the agent starts hidden
            # below a relay, as the caller, with no capabilities left.
            ident = layout.identity
            layer = layer_setting(spec, ident)
            self.cid = backend.create(spec, layout,
                                      agent_argv("--caller", str(ident.uid), "--hide",
                                                 str(ident.gid), "--shell", spec.shell,
                                                 "--egress", self.network.relay_setting(),
                                                 "--layer", layer),
                                      runtime, image, stdin_open=True,
                                      init_capabilities=_capabilities(HIDE_CAPABILITIES, layer))
            self.sandbox_id = self.cid[:12]
            self.oom = ContainerOOMWatch(self.cid)
            self.memory = spec.limits.memory or 0
            self.process = DockerProcess(backend.client().api, self.cid, None, interactive=True)
            self.process.start()
        except BaseException:
            self.close()
            raise
        self.stdout_fd = self.process.stdout.fileno()
        self._stderr = _StderrTail(self.process.stderr.fileno())

    def send(self, data: bytes) -> None:
        self.process.send(data)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def memory_events(self) -> int:
        """How often the container's memory cgroup ended something in it so far."""
        return self.oom.sample() if self.oom is not None else 0

    def memory_note(self) -> str:
        return (f"memory limit: the container reached its limit of {self.memory >> 20} MiB "
                "(container cgroup) and the process that crossed it was killed")

    def stderr_text(self) -> str:
        return self._stderr.text() if self.process is not None else ""

    def close(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=15)
            process.close()
            for stream in (process.stdout, process.stderr):
                with contextlib.suppress(OSError):
                    stream.close()
            if process.error or process.poll() is None:
                from .docker import remove_container

                remove_container(process.api, process.cid)
        if self.oom is not None:
            self.oom.close()
        _release(self)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def _release(transport: RunscTransport | DockerTransport) -> None:
    """The sandbox has ended: its stand-ins may go (see ``stand_ins.py``)."""
    layout = getattr(transport, "layout", None)
    if layout is not None:
        transport.layout = None
        layout.release()
