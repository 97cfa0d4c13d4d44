"""A running container that looks like a ``Popen`` to ``process.supervise``.

Docker multiplexes stdout and stderr on one attach socket; a pump thread
splits the frames into two pipes, so the same select-based supervisor streams,
caps, times out and interrupts containers exactly as it does local processes.
The exit status comes from a wait registered *before* the container starts
(as ``docker run --rm`` does), so an auto-removed container cannot take its
status with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading

from ..errors import SandboxStartError
from ..process import kill_processes_mentioning
from .docker_api import raw_socket, register_removal_wait

log = logging.getLogger("gvisor_magic")


class DockerProcess:
    """Attach, wait and start one created container; expose it as a process."""

    def __init__(self, api, container_id: str, stdin: bytes | None,
                 interactive: bool = False) -> None:
        self.api = api
        self.cid = container_id
        self._stdin = stdin
        #: Keep stdin open for ``send`` (a session agent) instead of feeding bytes once.
        self.interactive = interactive
        self.returncode: int | None = None
        #: Why the container ended abnormally from Docker's side (daemon lost...).
        self.error: str | None = None
        self.stdin = None  # stdin is written by our own thread, not by supervise
        out_r, self._out_w = os.pipe()
        err_r, self._err_w = os.pipe()
        self.stdout = open(out_r, "rb", buffering=0)  # noqa: SIM115 (closed by supervise)
        self.stderr = open(err_r, "rb", buffering=0)  # noqa: SIM115
        self._socket = None
        self._wait_response = None
        self._threads: list[threading.Thread] = []
        self._done = threading.Event()
        self._pipe_lock = threading.Lock()

    # -- start ----------------------------------------------------------------

    def start(self) -> None:
        """Attach, register the wait, start. Any failure here means the command never ran."""
        wants_stdin = self._stdin is not None or self.interactive
        params = {"stdout": 1, "stderr": 1, "stream": 1, "stdin": int(wants_stdin)}
        try:
            self._socket = self.api.attach_socket(self.cid, params=params)
            self._wait_response = register_removal_wait(self.api, self.cid)
        except Exception as exc:
            self._close_pipes()
            raise SandboxStartError("docker", f"cannot attach to the container: {exc}") from exc
        raw = raw_socket(self._socket)
        raw.settimeout(None)
        self._start_thread(self._pump, raw)
        self._start_thread(self._wait)
        try:
            self.api.start(self.cid)
        except Exception as exc:
            self.close()
            raise SandboxStartError("docker", f"the container did not start: {exc}") from exc
        if self._stdin is not None and not self.interactive:
            self._start_thread(self._feed, raw)

    def send(self, data: bytes) -> None:
        """Write to the container's stdin (interactive mode)."""
        raw_socket(self._socket).sendall(data)

    def _start_thread(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True,
                                  name=f"gvisor-magic-{target.__name__}")
        thread.start()
        self._threads.append(thread)

    # -- threads --------------------------------------------------------------

    def _pump(self, raw: socket.socket) -> None:
        """Split Docker's multiplexed frames (8-byte header) into the two pipes."""
        targets = {1: self._out_w, 2: self._err_w}
        try:
            while True:
                header = _recv_exactly(raw, 8)
                if header is None:
                    break
                kind, size = header[0], struct.unpack(">I", header[4:])[0]
                payload = _recv_exactly(raw, size) if size else b""
                if payload is None:
                    break
                fd = targets.get(kind)
                if fd is not None:
                    _write_all(fd, payload)
        except OSError:
            pass
        finally:
            self._close_pipes()

    def _feed(self, raw: socket.socket) -> None:
        try:
            raw.sendall(self._stdin or b"")
            raw.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _wait(self) -> None:
        try:
            data = self._wait_response.json()
            self.returncode = int(data.get("StatusCode", -1))
            message = (data.get("Error") or {}).get("Message")
            if message:
                self.error = f"Docker reported: {message}"
        except Exception as exc:
            self.error = f"lost the connection to the Docker daemon while the command ran: {exc}"
            self.returncode = -1
        finally:
            self._done.set()

    # -- the Popen subset supervise uses ------------------------------------------

    def poll(self) -> int | None:
        return self.returncode if self._done.is_set() else None

    def wait(self, timeout: float | None = None) -> int:
        import subprocess

        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired("docker container", timeout or 0)
        return self.returncode if self.returncode is not None else -1

    def kill(self) -> None:
        """Kill the container; if the daemon cannot, kill what serves it on the host.

        Detach first: a command flooding its output would otherwise keep dockerd
        blocked writing to our attach socket (the pump waits on a full pipe that
        the caller, busy here, does not read), and dockerd does not finish a kill
        until the container's output is copied. Output after a kill is not wanted.
        """
        if self._socket is not None:
            with contextlib.suppress(Exception):
                raw_socket(self._socket).shutdown(socket.SHUT_RDWR)
        try:
            self.api.kill(self.cid, "KILL")
        except Exception as exc:
            log.warning("gvisor: docker kill %s failed (%s); killing its processes",
                        self.cid[:12], exc)
            kill_processes_mentioning(self.cid, "container")
            if not self._done.is_set():
                self.error = self.error or f"the Docker daemon could not stop the container: {exc}"
                self.returncode = -9
                self._done.set()

    def close(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(Exception):
                raw_socket(self._socket).shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(Exception):
                self._socket.close()
        if self._wait_response is not None and not self._done.is_set():
            with contextlib.suppress(Exception):
                self._wait_response.close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._close_pipes()

    def _close_pipes(self) -> None:
        with self._pipe_lock:  # the pump and close() may both get here
            for name in ("_out_w", "_err_w"):
                fd = getattr(self, name)
                if fd is not None:
                    setattr(self, name, None)
                    with contextlib.suppress(OSError):
                        os.close(fd)


def _recv_exactly(raw: socket.socket, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = raw.recv(min(left, 65536))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _write_all(fd: int | None, data: bytes) -> None:
    view = memoryview(data)
    while view and fd is not None:
        written = os.write(fd, view)
        view = view[written:]
