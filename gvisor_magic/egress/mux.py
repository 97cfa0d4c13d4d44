"""The host's end of a sandbox's network channel: one socket, many connections.

The sandbox gets one end of a socket pair as a descriptor of its PID 1
(``runsc run --pass-fd``); nothing else of the host is reachable from inside by
a Unix socket (runsc runs without ``--host-uds=open``). Its relay
(``sandboxed/egress_relay.py``, where the frames are described) turns every
connection a tool makes to it into a stream on that socket. Here each stream
is handed, on the same event loop, to the sandbox's ``EgressProxy`` as one
connection (``EgressProxy.serve``): no second socket, no second copy of the bytes.
The proxy reads and writes the stream through an ordinary
``asyncio.StreamReader``/``StreamWriter`` pair whose transport is the stream
(``_Stream``): what the sandbox sends is fed to the reader, what the proxy writes
goes out as frames, as the sandbox's credit allows.

What comes from the sandbox is hostile until checked: a frame that breaks the
protocol (an unknown kind, a payload over ``PAYLOAD_MAX``, more data than the
credit given, a stream id that does not grow, more than ``STREAMS_MAX``
streams) ends the whole channel, and with it every stream; it never stops or
slows the host. What the host holds for one sandbox stays bounded, per stream:
what the proxy has not read yet (credit goes back only while its reader is under
its limit, so that is at most twice the reader's limit plus ``WINDOW``) and at
most ``WRITE_HIGH`` plus one write of the proxy's on the way out (the proxy's
``drain`` waits beyond that); at most ``STREAMS_MAX`` streams.

Everything runs on the proxies' event loop (``proxy._Loop``); ``close`` ends it
all and waits for it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from .proxy import MAX_HEAD, _Loop

log = logging.getLogger("gvisor_magic.egress")

# The same numbers as the relay's (MUX_*): tests/unit/test_mux.py holds them equal.
OPEN, DATA, EOF, CLOSE, CREDIT = 1, 2, 3, 4, 5
HEADER = 9
PAYLOAD_MAX = 128 * 1024
WINDOW = 256 * 1024
#: Credit goes back once this much was given to the proxy's reader.
RETURN_AT = 64 * 1024
#: The relay's RELAY_CONNECTIONS_MAX: it never opens more at once.
STREAMS_MAX = 256
#: What the proxy may have written to a stream and not yet sent before its ``drain``
#: waits, and how low that must fall before it goes on.
WRITE_HIGH = WINDOW
WRITE_LOW = WINDOW // 2
_KINDS = {OPEN: "OPEN", DATA: "DATA", EOF: "EOF", CLOSE: "CLOSE", CREDIT: "WINDOW"}

#: What serves one connection (``EgressProxy.serve``).
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ProtocolError(Exception):
    """The sandbox broke the channel's protocol: the channel ends."""


def frame(sid: int, kind: int, payload: bytes = b"") -> bytes:
    """One frame: stream id, kind, length, payload."""
    if len(payload) > PAYLOAD_MAX:
        raise ValueError(f"a frame's payload is at most {PAYLOAD_MAX} bytes")
    return sid.to_bytes(4, "big") + bytes((kind,)) + len(payload).to_bytes(4, "big") + payload


def parse_header(head: bytes) -> tuple[int, int, int]:
    """(stream id, kind, length) of a frame's header; ``ProtocolError`` if it cannot be one."""
    sid, kind, length = int.from_bytes(head[:4], "big"), head[4], int.from_bytes(head[5:], "big")
    if kind not in _KINDS:
        raise ProtocolError(f"unknown frame kind {kind}")
    if length > PAYLOAD_MAX:
        raise ProtocolError(f"a {_KINDS[kind]} frame of {length} bytes")
    if kind in (OPEN, EOF, CLOSE) and length:
        raise ProtocolError(f"a {_KINDS[kind]} frame with a payload")
    if kind == CREDIT and length != 4:
        raise ProtocolError("a WINDOW frame whose payload is not 4 bytes")
    return sid, kind, length


class _Stream(asyncio.Transport):
    """One connection of the sandbox, as the host sees it, and the transport the proxy
    reads and writes it through. Only ever used on the channel's loop."""

    def __init__(self, sid: int, limit: int) -> None:
        super().__init__()
        self.sid = sid
        loop = asyncio.get_running_loop()
        self.reader = asyncio.StreamReader(limit=limit, loop=loop)
        self.protocol = asyncio.StreamReaderProtocol(self.reader, loop=loop)
        self.protocol.connection_made(self)
        self.writer = asyncio.StreamWriter(self, self.protocol, self.reader, loop)
        #: Woken for the stream's sender: bytes, credit, a resumed reader, the close.
        self.wake = asyncio.Event()
        # From the sandbox: received and not yet credited back; its EOF.
        self.unreturned = 0
        self.eof = False
        self.reading_paused = False
        # To the sandbox: written by the proxy and not sent; what may still be sent.
        self.outbound: collections.deque[bytes] = collections.deque()
        self.outbound_size = 0
        self.credit = WINDOW
        self.writing_paused = False
        self.closing = False
        self.lost = False
        self.task: asyncio.Task[None] | None = None

    # -- asyncio.Transport, as the proxy's StreamReader and StreamWriter use it ---------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or not data:
            return  # as a socket's transport does once it is closed
        self.outbound.append(bytes(data))
        self.outbound_size += len(data)
        if not self.writing_paused and self.outbound_size > WRITE_HIGH:
            self.writing_paused = True
            self.protocol.pause_writing()
        self.wake.set()

    def can_write_eof(self) -> bool:
        return False  # the stream ends as a whole: the proxy closes, the host sends CLOSE

    def close(self) -> None:
        self.closing = True
        self.wake.set()

    def abort(self) -> None:
        self.outbound.clear()
        self.outbound_size = 0
        self.close()

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False
        self.wake.set()

    def is_reading(self) -> bool:
        return not self.reading_paused

    def get_write_buffer_size(self) -> int:
        return self.outbound_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return WRITE_LOW, WRITE_HIGH

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        raise NotImplementedError("a channel's stream keeps its protocol")

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    # -- the channel's side -------------------------------------------------------------

    def take(self) -> bytes:
        """The next bytes to send (there are some), as many as the credit and a frame allow:
        several of the proxy's writes in one frame."""
        room = min(self.credit, PAYLOAD_MAX)
        parts = []
        while self.outbound and room:
            part = self.outbound.popleft()
            if len(part) > room:
                self.outbound.appendleft(part[room:])
                part = part[:room]
            parts.append(part)
            room -= len(part)
        chunk = parts[0] if len(parts) == 1 else b"".join(parts)
        self.outbound_size -= len(chunk)
        self.credit -= len(chunk)
        if self.writing_paused and self.outbound_size <= WRITE_LOW:
            self.writing_paused = False
            self.protocol.resume_writing()
        return chunk

    def connection_lost(self) -> None:
        """The stream is over: the proxy's reader ends, its writer's ``drain`` fails."""
        if not self.lost:
            self.lost = self.closing = True
            self.outbound.clear()
            self.outbound_size = 0
            self.protocol.connection_lost(None)


class Channel:
    """One sandbox's channel: start it, hand ``sandbox_fd`` to runsc (``--pass-fd``), call
    ``sandbox_started`` once runsc holds it, and ``close`` after the sandbox ended.

    ``serve`` serves each stream as one connection (``EgressProxy.serve``), on the
    proxies' loop, from a reader whose limit is ``limit``."""

    def __init__(self, serve: Handler, label: str = "", limit: int = MAX_HEAD) -> None:
        self.serve = serve
        self.label = label
        self.limit = limit
        host, sandbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (host, sandbox):
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                with contextlib.suppress(OSError):
                    end.setsockopt(socket.SOL_SOCKET, option, WINDOW)
        self._host_end: socket.socket | None = host
        self._sandbox_end: socket.socket | None = sandbox
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Future[None] | None = None
        self._streams: dict[int, _Stream] = {}
        #: Every stream's task until it is over (a stream leaves ``_streams`` first).
        self._serving: set[asyncio.Task[None]] = set()
        self._last_sid = 0
        self._writer: asyncio.StreamWriter | None = None
        self._send_lock: asyncio.Lock | None = None
        self._task_on_loop: asyncio.Task[None] | None = None
        #: Why the channel ended early (a protocol error), if it did.
        self.error: str | None = None
        #: Streams opened over the channel's life.
        self.opened = 0

    @property
    def sandbox_fd(self) -> int:
        assert self._sandbox_end is not None, "the sandbox's end was given away"
        return self._sandbox_end.fileno()

    def start(self) -> Channel:
        self._loop = _Loop.get()
        assert self._host_end is not None
        self._host_end.setblocking(False)
        self._task = asyncio.run_coroutine_threadsafe(self._run(), self._loop)
        return self

    def sandbox_started(self) -> None:
        """runsc has its own copy of the sandbox's end: close ours (idempotent)."""
        end, self._sandbox_end = self._sandbox_end, None
        if end is not None:
            end.close()

    def close(self) -> None:
        """End every stream and the channel; idempotent, and waits until all is gone."""
        self.sandbox_started()
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed() and self._task is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._stop(), loop).result(timeout=15)
            with contextlib.suppress(Exception):
                self._task.result(timeout=15)
        host, self._host_end = self._host_end, None
        if host is not None:
            host.close()

    async def _stop(self) -> None:
        task = self._task_on_loop
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    # -- on the loop --------------------------------------------------------------------

    async def _run(self) -> None:
        self._task_on_loop = asyncio.current_task()
        self._send_lock = asyncio.Lock()
        assert self._host_end is not None
        try:
            reader, self._writer = await asyncio.open_unix_connection(
                sock=self._host_end, limit=2 * PAYLOAD_MAX)
            self._writer.transport.set_write_buffer_limits(high=WINDOW)
            while True:
                try:
                    head = await reader.readexactly(HEADER)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        raise ProtocolError("the channel ended inside a frame") from None
                    break  # the sandbox ended
                sid, kind, length = parse_header(head)
                try:
                    payload = await reader.readexactly(length) if length else b""
                except asyncio.IncompleteReadError:
                    raise ProtocolError("the channel ended inside a frame") from None
                self._dispatch(sid, kind, payload)
        except ProtocolError as exc:
            self.error = str(exc)
            log.warning("gvisor: egress channel of %s closed: %s", self.label, exc)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass  # the sandbox ended mid-frame, or its end went away
        finally:
            self._streams.clear()
            tasks = list(self._serving)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            if self._writer is not None:
                # At once, whatever is still queued: a sandbox that stopped reading
                # must not hold the host here.
                self._writer.transport.abort()

    def _dispatch(self, sid: int, kind: int, payload: bytes) -> None:
        if kind == OPEN:
            if sid <= self._last_sid:
                raise ProtocolError(f"stream {sid} opened after stream {self._last_sid}")
            if len(self._streams) >= STREAMS_MAX:
                raise ProtocolError(f"more than {STREAMS_MAX} streams at once")
            self._last_sid = sid
            stream = self._streams[sid] = _Stream(sid, self.limit)
            stream.task = task = asyncio.ensure_future(self._serve(stream))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)
            self.opened += 1
            return
        stream = self._streams.get(sid)
        if stream is None:
            if sid > self._last_sid:
                raise ProtocolError(f"a {_KINDS[kind]} frame for stream {sid}, never opened")
            return  # a stream already over: frames in flight are dropped
        if kind == DATA:
            if stream.eof:
                raise ProtocolError(f"data on stream {sid} after its EOF")
            stream.unreturned += len(payload)
            if stream.unreturned > WINDOW:
                raise ProtocolError(f"stream {sid} sent more than its credit")
            if payload and not stream.lost:
                stream.protocol.data_received(payload)
            if stream.unreturned >= RETURN_AT and not stream.reading_paused:
                stream.wake.set()
        elif kind == EOF:
            if stream.eof:
                raise ProtocolError(f"a second EOF on stream {sid}")
            stream.eof = True
            stream.protocol.eof_received()
        elif kind == CREDIT:
            stream.credit += int.from_bytes(payload, "big")
            if stream.credit > WINDOW:
                raise ProtocolError(f"stream {sid} returned credit it was never given")
            stream.wake.set()
        else:  # CLOSE: the sandbox's client went away
            del self._streams[sid]
            if stream.task is not None:
                stream.task.cancel()

    async def _send(self, sid: int, kind: int, payload: bytes = b"") -> None:
        assert self._writer is not None and self._send_lock is not None
        async with self._send_lock:
            self._writer.write(frame(sid, kind, payload))
            await self._writer.drain()

    async def _serve(self, stream: _Stream) -> None:
        """One stream: the proxy serves it as a connection; what it writes goes to the
        sandbox as its credit allows, and credit goes back as the proxy's reader takes
        the sandbox's bytes. Over once the proxy closed it and all of it was sent."""
        served = asyncio.ensure_future(self.serve(stream.reader, stream.writer))
        # However the proxy ends (an error of its own too), the stream ends with it.
        served.add_done_callback(lambda _: stream.close())
        over = waited = False
        try:
            while True:
                if stream.unreturned >= RETURN_AT and not stream.reading_paused:
                    credit, stream.unreturned = stream.unreturned, 0
                    await self._send(stream.sid, CREDIT, credit.to_bytes(4, "big"))
                elif stream.outbound and stream.credit > 0:
                    if (not waited and not stream.closing
                            and stream.outbound_size < min(stream.credit, PAYLOAD_MAX)):
                        # Once round the loop first: what the proxy writes next (it reads
                        # 64 KiB at a time) goes in the same frame. Fewer, larger frames
                        # cost the host and the sandbox less.
                        waited = True
                        await asyncio.sleep(0)
                        continue
                    waited = False
                    await self._send(stream.sid, DATA, stream.take())
                elif stream.closing and not stream.outbound:
                    over = True
                    break
                else:
                    stream.wake.clear()
                    await stream.wake.wait()
        except (ConnectionError, OSError):
            pass  # the channel went away: it ends every stream
        finally:
            if not over:  # the sandbox or the channel ended it first
                served.cancel()
            with contextlib.suppress(BaseException):
                await served
            stream.connection_lost()
            if self._streams.get(stream.sid) is stream:
                # The proxy ended the connection: so does the sandbox.
                del self._streams[stream.sid]
                with contextlib.suppress(Exception):
                    await self._send(stream.sid, CLOSE)
