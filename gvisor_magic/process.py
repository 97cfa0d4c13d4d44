"""Supervising one child process: streaming, capture caps, stdin, timeout, interrupt.

Every backend ends up with a local ``Popen`` (``runsc run``, ``docker``'s
attach, a plain shell), so this one helper does the delicate part for all of
them. It runs in the caller's thread with ``select`` rather than reader
threads, which means ``on_output`` is called in the caller's thread (where
IPython expects output) and ``KeyboardInterrupt`` arrives exactly here.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import selectors
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .interrupts import checkpoint

OutputCallback = Callable[[str, str], None]

_CHUNK = 65536
# After the main process exits, how long its pipes may stay open (something it
# left behind still holding them) before we stop reading.
_DRAIN_GRACE = 2.0
# How long a killed process tree may take to go away before we escalate.
_KILL_GRACE = 10.0


@dataclass
class Capture:
    """Bytes of one stream, kept up to ``limit``; everything is still streamed."""

    name: str
    limit: int | None
    data: bytearray = field(default_factory=bytearray)
    truncated: bool = False
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))

    def add(self, chunk: bytes) -> None:
        if self.limit is None:
            self.data += chunk
            return
        room = self.limit - len(self.data)
        if room >= len(chunk):
            self.data += chunk
        else:
            self.data += chunk[:max(room, 0)]
            self.truncated = True

    def text(self) -> str:
        return bytes(self.data).decode("utf-8", errors="replace")


@dataclass
class Outcome:
    """How a supervised process ended, before a backend turns it into a result."""

    returncode: int
    stdout: Capture
    stderr: Capture
    timed_out: bool
    interrupted: bool
    duration: float
    #: Whether ``stderr_gate`` was seen (the command really started); None if no gate.
    gate_seen: bool | None = None
    #: Bytes on stderr before the gate: the sandbox's own start-up error output.
    pre_gate: bytes = b""


class _Gate:
    """Strips a start marker from the head of stderr and holds output until it is seen.

    A sandbox's init writes the marker before it starts the user's command, so
    its presence proves the command may have run; its absence proves it did not
    (and whatever came instead is the sandbox's own error message).
    """

    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        self.buffer = b""
        self.seen = False
        self.failed = False

    def feed(self, chunk: bytes) -> bytes:
        if self.seen:
            return chunk
        if self.failed:
            self.buffer += chunk
            return b""
        self.buffer += chunk
        if self.buffer.startswith(self.marker):
            self.seen = True
            rest = self.buffer[len(self.marker):]
            self.buffer = b""
            return rest
        if not self.marker.startswith(self.buffer):
            self.failed = True
        return b""


def supervise(
    proc: subprocess.Popen[bytes],
    *,
    kill: Callable[[], None],
    stdin: bytes | None = None,
    timeout: float | None = None,
    on_output: OutputCallback | None = None,
    max_output: int | None = None,
    stderr_gate: bytes | None = None,
    on_exit: Callable[[], None] | None = None,
) -> Outcome:
    """Stream ``proc``'s output until it ends, killing it on timeout or interrupt.

    ``kill`` must make the whole process tree (and its sandbox) go away.
    ``on_exit`` runs once the main process has exited, before draining its
    pipes: backends use it to end anything the command left behind, so the
    pipes close. Exceptions raised by ``on_output`` kill the command and are
    re-raised after cleanup; ``KeyboardInterrupt`` is turned into
    ``Outcome.interrupted`` so the caller can report partial output.
    """
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    out = Capture("stdout", max_output)
    err = Capture("stderr", max_output)
    gate = _Gate(stderr_gate) if stderr_gate is not None else None
    captures = {}
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None and proc.stderr is not None
    for stream, capture in ((proc.stdout, out), (proc.stderr, err)):
        os.set_blocking(stream.fileno(), False)
        sel.register(stream.fileno(), selectors.EVENT_READ)
        captures[stream.fileno()] = capture
    pending_in = memoryview(stdin or b"")
    if proc.stdin is not None:
        if pending_in:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
        else:
            proc.stdin.close()

    timed_out = interrupted = False
    killed = False
    exited_at: float | None = None
    failure: BaseException | None = None

    def emit(capture: Capture, chunk: bytes, quiet: bool = False) -> None:
        if capture is err and gate is not None:
            chunk = gate.feed(chunk)
        capture.add(chunk)
        if on_output is not None and not quiet:
            text = capture.decoder.decode(chunk)
            if text:
                on_output(capture.name, text)

    def do_kill() -> None:
        nonlocal killed, interrupted
        if not killed:
            killed = True
            interrupted = _uninterruptible(kill) or interrupted

    try:
        while sel.get_map():
            checkpoint()  # an interrupt asked from another thread, as Ctrl-C (interrupts.py)
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
                if on_exit is not None:
                    interrupted = _uninterruptible(on_exit) or interrupted
            if exited_at is not None and now - exited_at > _DRAIN_GRACE:
                break
            if deadline is not None and now >= deadline and exited_at is None:
                timed_out = True
                do_kill()
                deadline = None
            wait = 0.1 if deadline is None else max(0.0, min(0.1, deadline - now))
            for key, events in sel.select(wait):
                fd = key.fd
                if events & selectors.EVENT_WRITE:
                    pending_in = _write_some(fd, pending_in, sel, proc)
                    continue
                try:
                    chunk = os.read(fd, _CHUNK)
                except BlockingIOError:
                    continue
                if chunk:
                    emit(captures[fd], chunk)
                else:
                    sel.unregister(fd)
    except KeyboardInterrupt:
        interrupted = True
        do_kill()
    except BaseException as exc:  # an on_output callback failed: stop the command
        failure = exc
        do_kill()
    finally:
        interrupted = _finish(proc, sel, captures, emit, do_kill,
                              quiet=interrupted or failure is not None) or interrupted
        sel.close()
    if failure is not None:
        raise failure
    for capture in (out, err):
        if on_output is not None:
            tail = capture.decoder.decode(b"", True)
            if tail:
                on_output(capture.name, tail)
    returncode = proc.returncode if proc.returncode is not None else -9
    return Outcome(
        returncode=returncode, stdout=out, stderr=err, timed_out=timed_out,
        interrupted=interrupted, duration=time.monotonic() - start,
        gate_seen=None if gate is None else gate.seen,
        pre_gate=b"" if gate is None or gate.seen else gate.buffer,
    )


def _write_some(fd: int, pending: memoryview, sel: selectors.BaseSelector,
                proc: subprocess.Popen[bytes]) -> memoryview:
    try:
        written = os.write(fd, pending[:_CHUNK])
        pending = pending[written:]
    except BlockingIOError:
        return pending
    except (BrokenPipeError, OSError):
        pending = pending[:0]
    if not pending:
        sel.unregister(fd)
        assert proc.stdin is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()
    return pending


def _finish(proc: subprocess.Popen[bytes], sel: selectors.BaseSelector, captures: dict,
            emit: Callable[..., None], do_kill: Callable[[], None], quiet: bool) -> bool:
    """Wait for the process after a kill and collect whatever output is left.

    Returns whether the user interrupted meanwhile.
    """
    interrupted = False
    end = time.monotonic() + _KILL_GRACE
    while True:
        try:
            proc.wait(timeout=max(0.0, end - time.monotonic()))
            break
        except subprocess.TimeoutExpired:
            do_kill()
            proc.kill()
            end = time.monotonic() + _KILL_GRACE
        except KeyboardInterrupt:
            interrupted = True
            do_kill()
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    # Read what is already buffered in the pipes, without waiting for more.
    for key in list(sel.get_map().values()):
        if key.events & selectors.EVENT_WRITE:
            continue
        while True:
            try:
                chunk = os.read(key.fd, _CHUNK)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            emit(captures[key.fd], chunk, quiet=quiet)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    return interrupted


def _uninterruptible(action: Callable[[], None]) -> bool:
    """Run a cleanup step to the end even if the user presses Ctrl-C again.

    Returns whether an interrupt arrived meanwhile, so the caller can honour it.
    """
    interrupted = False
    while True:
        try:
            action()
            return interrupted
        except KeyboardInterrupt:
            interrupted = True


def kill_processes_mentioning(token: str, what: str) -> int:
    """Kill every process whose command line contains ``token``; return how many.

    Sandboxes and containers are named by an id that their runsc, gofer and
    shim processes carry on their command lines: this finds what a runtime
    left behind when it could not clean up itself (a failed start, a lost
    daemon, a kill during start-up).
    """
    import logging

    import psutil

    killed = 0
    for process in psutil.process_iter(["cmdline"]):
        try:
            cmdline = process.info["cmdline"] or []
        except (psutil.Error, KeyError):
            continue
        if any(token in part for part in cmdline):
            with contextlib.suppress(psutil.Error):
                process.kill()
                killed += 1
                logging.getLogger("gvisor_magic").warning(
                    "gvisor: killed leftover process %s of %s %s", process.pid, what, token[:12])
    return killed
