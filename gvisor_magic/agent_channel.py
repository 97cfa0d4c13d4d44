"""The host's side of the session agent's protocol (see ``sandboxed/session_agent.py``;
its wire, shared with the agent: ``sandboxed/agent_wire.py``).

``Channel`` frames bytes; ``AgentClient`` speaks the protocol over it. Everything
that arrives here comes from inside a sandbox and is untrusted: a frame of an
unknown type or over ``MAX_FRAME`` bytes, a malformed report, or a closed channel
is ``SessionBroken``; every read waits at most until a deadline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import select
import threading
import time
from collections.abc import Mapping

from .interrupts import checkpoint
from .process import Capture, OutputCallback
from .result import returncode_of
from .sandboxed.agent_wire import (
    ACCEPTED,
    COPIED,
    COPY_OUT,
    EXIT,
    FROM_AGENT,
    GO,
    HELLO,
    KILL,
    MAX_FRAME,
    RUN,
    SETTLED,
    STDERR,
    STDOUT,
    WIRE_HEADER,
    pack_frame,
    parse_header,
)

__all__ = ["MAX_FRAME", "AgentClient", "AgentRun", "Channel", "SessionBroken"]


class SessionBroken(Exception):
    """The agent broke the protocol, went silent, or its sandbox died."""


class Channel:
    """Frames to and from the agent, with bounded sizes and bounded waits."""

    def __init__(self, transport) -> None:
        self.transport = transport
        self._buffer = bytearray()
        self._sending = threading.Lock()  # a copy-out is asked from another thread
        #: The agent's answers to ``COPY_OUT`` (``COPIED`` frames), whenever they come.
        self.copied: queue.Queue[bytes] = queue.Queue()

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        try:
            with self._sending:
                self.transport.send(pack_frame(kind, payload))
        except (OSError, ValueError) as exc:
            raise SessionBroken(f"cannot write to the sandbox agent: {exc}") from exc

    def receive(self, deadline: float | None) -> tuple[bytes, bytes] | None:
        """The next frame, or None when ``deadline`` passes first (``COPIED`` frames go to
        ``copied``, for the thread that asked). An interrupt asked of this thread from
        another (``interrupts.Interrupt``) arrives here as a ``KeyboardInterrupt``."""
        while True:
            checkpoint()
            frame = self._parse()
            if frame is not None and frame[0] == COPIED:
                self.copied.put(frame[1])
                continue
            if frame is not None:
                return frame
            wait = 0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic()))
            ready, _, _ = select.select([self.transport.stdout_fd], [], [], wait)
            if ready:
                try:
                    chunk = os.read(self.transport.stdout_fd, MAX_FRAME)
                except OSError as exc:
                    # A peer killed with our frame unread resets the socket instead of
                    # closing it (ECONNRESET, seen in CI 2026-12-07): the same as EOF.
                    raise SessionBroken(f"the sandbox agent's channel broke: {exc} "
                                        f"({self.transport.stderr_text()[-300:] or 'no message'})"
                                        ) from exc
                if not chunk:
                    raise SessionBroken("the sandbox agent closed its channel "
                                        f"({self.transport.stderr_text()[-300:] or 'no message'})")
                self._buffer += chunk
            elif deadline is not None and time.monotonic() >= deadline:
                return None

    def _parse(self) -> tuple[bytes, bytes] | None:
        start = WIRE_HEADER.size
        if len(self._buffer) < start:
            return None
        kind, size = parse_header(self._buffer[:start])
        if kind not in FROM_AGENT or size > MAX_FRAME:
            raise SessionBroken(f"malformed frame from the sandbox agent (type {kind!r}, "
                                f"{size} bytes)")
        if len(self._buffer) < start + size:
            return None
        payload = bytes(self._buffer[start:start + size])
        del self._buffer[:start + size]
        return kind, payload


#: How long an idle agent may take to accept a command before it counts as broken.
ACCEPT_TIMEOUT = 10.0
#: How long the agent may take to confirm that it killed a command.
KILL_GRACE = 15.0
#: How long the agent may take, after a command's report, to undo what the command left
#: (and, after a pool's call, to empty /tmp and HOME) before it counts as broken.
SETTLE_TIMEOUT = 60.0


@dataclasses.dataclass
class AgentRun:
    """What the agent said about one command, for ``IsolatedSession`` to turn into a result."""

    #: The agent's exit report: ``{"exit": N}`` or ``{"signal": N}``, ``"killed"`` when we
    #: killed it, ``"tainted"`` when the sandbox cannot be trusted for the next command.
    status: dict | None = None
    #: The agent accepted the command and was told to run it (it may have run).
    accepted: bool = False
    timed_out: bool = False
    interrupted: bool = False
    #: The channel broke (garbage, silence, a dead sandbox): why.
    broken: SessionBroken | None = None
    #: The sandbox must go: broken, or interrupted while the agent was not listening.
    lost: bool = False
    #: What ``on_output`` raised; the command was killed, the caller raises it again.
    failure: BaseException | None = None

    def returncode(self, *, failed: bool) -> int:
        """The report through the one rule (``result.returncode_of``)."""
        status = self.status
        if status is None:
            return returncode_of(None, timed_out=self.timed_out, failed=failed)
        if "signal" in status:
            raw, seen = 128 + int(status["signal"]), f"signal {int(status['signal'])}"
        else:
            raw = int(status["exit"])
            seen = f"exit {raw}"
        return returncode_of(raw, init_status=seen, timed_out=self.timed_out,
                             interrupted=bool(status.get("killed")))


class AgentClient:
    """The host's side of the agent's protocol: hello, run (accept, go, stream, end), kill.

    Everything it reads is untrusted and bounded (``Channel``); it never starts or stops
    a sandbox (``IsolatedSession`` does), it only says when one must go (``AgentRun.lost``).
    """

    def __init__(self, transport) -> None:
        self.channel = Channel(transport)
        #: A command was told to run and has not ended yet (``copy_out`` may be asked).
        self.running = False
        #: A command's report came, and the agent's word that it undid what the command
        #: left (``SETTLED``) has not been read yet: ``settle`` reads it.
        self.settling = False

    def hello(self, deadline: float) -> bool:
        """True once the agent said it is ready; False if it did not before ``deadline``."""
        frame = self.channel.receive(deadline)
        return frame is not None and frame[0] == HELLO

    def settle(self, deadline: float) -> str:
        """Wait for the agent to have undone what the last command left (it works on it
        after the command's report, while nobody waits): "" once it did, or why the
        sandbox cannot be trusted for another command. ``SessionBroken`` if it breaks or
        says nothing by ``deadline``."""
        while self.settling:
            frame = self.channel.receive(deadline)
            if frame is None:
                raise SessionBroken("the sandbox agent did not finish cleaning up after the "
                                    "last command in time")
            if frame[0] != SETTLED:
                raise SessionBroken(f"unexpected {frame[0]!r} frame from the sandbox agent "
                                    "between commands")
            self.settling = False
            try:
                word = json.loads(frame[1])
            except ValueError:
                word = None
            if not isinstance(word, dict) or not isinstance(word.get("tainted", ""), str):
                raise SessionBroken("malformed clean-up report from the sandbox agent")
            return word.get("tainted", "")
        return ""

    def run(self, request: Mapping[str, object], out: Capture, err: Capture,
            on_output: OutputCallback | None, deadline: float | None) -> AgentRun:
        """Send one command and follow it to its end, a timeout, an interrupt or a break."""
        run = AgentRun()
        try:
            self.channel.send(RUN, json.dumps(request).encode())
            # An idle agent answers at once; one that does not is broken (or busy with
            # something a command left behind).
            try:
                frame = self.channel.receive(time.monotonic() + ACCEPT_TIMEOUT)
            except KeyboardInterrupt:
                run.interrupted = run.lost = True  # it may have started: the sandbox goes
                return run
            if frame is None or frame[0] != ACCEPTED:
                what = "no answer" if frame is None else f"a {frame[0]!r} frame"
                raise SessionBroken(f"the sandbox agent sent {what} instead of accepting "
                                    "the command")
            # Only now may it run: an agent we gave up on never gets this, so a command
            # retried on a fresh sandbox cannot also run in the stalled one.
            self.channel.send(GO)
            run.accepted = self.running = True
            while run.status is None:
                # An interrupt lands wherever this thread is: in the wait for a frame, or
                # in ``on_output`` (a kernel's stdout flush waits for its IO thread, and
                # the client that saw the output interrupts meanwhile). Either way the
                # command is killed and the run reports it, never left running.
                try:
                    frame = self.channel.receive(deadline)
                    if frame is None:
                        run.timed_out = True
                        run.status = self._kill(run)
                        break
                    kind, data = frame
                    if kind in (STDOUT, STDERR):
                        capture = out if kind == STDOUT else err
                        capture.add(data)
                        if on_output is not None:
                            text = capture.decoder.decode(data)
                            if text:
                                on_output(capture.name, text)
                    elif kind == EXIT:
                        run.status = parse_status(data)
                    else:
                        raise SessionBroken(
                            f"unexpected {kind!r} frame from the sandbox agent")
                except KeyboardInterrupt:
                    run.interrupted = True
                    run.status = self._kill(run)
                    break
                except SessionBroken:
                    raise
                except BaseException as exc:
                    # ``on_output`` failed: the command stops, then the caller re-raises.
                    run.failure = exc
                    run.status = self._kill(run)
                    break
        except SessionBroken as exc:
            run.broken, run.lost = exc, True
        finally:
            self.running = False
            # Every report is followed by the agent's word on its clean-up.
            self.settling = run.status is not None
        return run

    def copy_out(self, timeout: float) -> dict:
        """Ask the agent to copy its layer's changes out now, while the command runs (the
        thread in ``run`` reads the answer); its answer, or ``{"layer": why not}``."""
        if not self.running:
            return {"layer": "no command runs"}
        while True:  # an answer to an earlier ask that gave up waiting is stale
            try:
                self.channel.copied.get_nowait()
            except queue.Empty:
                break
        try:
            self.channel.send(COPY_OUT)
        except SessionBroken as exc:
            return {"layer": str(exc)}
        deadline = time.monotonic() + timeout
        while True:
            try:
                data = self.channel.copied.get(timeout=0.1)
            except queue.Empty:
                if not self.running:
                    return {"layer": "the command ended first"}
                if time.monotonic() >= deadline:
                    return {"layer": f"the sandbox agent did not answer in {timeout:g} s"}
                continue
            try:
                answer = json.loads(data)
            except ValueError:
                answer = None
            if not isinstance(answer, dict) or not isinstance(answer.get("layer"), str):
                return {"layer": "a malformed answer from the sandbox agent"}
            return answer

    def _kill(self, run: AgentRun) -> dict | None:
        """Kill the running command's tree inside the sandbox, keeping the sandbox."""
        try:
            self.channel.send(KILL)
            deadline = time.monotonic() + KILL_GRACE
            while True:
                frame = self.channel.receive(deadline)
                if frame is None:
                    raise SessionBroken("the sandbox agent did not confirm the kill")
                if frame[0] == EXIT:
                    return parse_status(frame[1])
        except KeyboardInterrupt:
            run.lost = True
            return None


def parse_status(data: bytes) -> dict:
    """The agent's exit report, or ``SessionBroken`` if it is not one."""
    try:
        status = json.loads(data)
    except ValueError as exc:
        raise SessionBroken("malformed exit report from the sandbox agent") from exc
    if not isinstance(status, dict) or not (
            isinstance(status.get("exit"), int) or isinstance(status.get("signal"), int)):
        raise SessionBroken("malformed exit report from the sandbox agent")
    return status
