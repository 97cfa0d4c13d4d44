"""The host's end of a sandbox's network channel: one socket, many connections.

The sandbox gets one end of a socket pair as a descriptor of its PID 1
(``runsc run --pass-fd``); nothing else of the host is reachable from inside by
a Unix socket (runsc runs without ``--host-uds=open``). Its relay
(``sandboxed/egress_relay.py``, where the frames are described) turns every
connection a tool makes to it into a stream on that socket. Here each stream
becomes one connection to the sandbox's ``EgressProxy``, on its Unix socket in
a private directory that no sandbox sees, and the bytes are piped both ways.

What comes from the sandbox is hostile until checked: a frame that breaks the
protocol (an unknown kind, a payload over ``PAYLOAD_MAX``, more data than the
credit given, a stream id that does not grow, more than ``STREAMS_MAX``
streams) ends the whole channel, and with it every stream; it never stops or
slows the host. What the host holds for one sandbox stays bounded: at most
``WINDOW`` bytes per stream in each direction, ``STREAMS_MAX`` streams.

Everything runs on the proxies' event loop (``proxy._Loop``); ``close`` ends it
all and waits for it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket

from .proxy import _Loop

log = logging.getLogger("gvisor_magic.egress")

# The same numbers as the relay's (MUX_*): tests/unit/test_mux.py holds them equal.
OPEN, DATA, EOF, CLOSE, CREDIT = 1, 2, 3, 4, 5
HEADER = 9
PAYLOAD_MAX = 128 * 1024
WINDOW = 256 * 1024
#: Credit goes back once this much was delivered to the proxy.
RETURN_AT = 64 * 1024
#: The relay's RELAY_CONNECTIONS_MAX: it never opens more at once.
STREAMS_MAX = 256
_KINDS = {OPEN: "OPEN", DATA: "DATA", EOF: "EOF", CLOSE: "CLOSE", CREDIT: "WINDOW"}


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


class _Stream:
    """One connection of the sandbox, as the host sees it."""

    def __init__(self, sid: int) -> None:
        self.sid = sid
        #: From the sandbox, not yet given to the proxy: bytes, or None for its EOF.
        self.inbound: collections.deque[bytes | None] = collections.deque()
        self.inbound_size = 0
        self.inbound_ready = asyncio.Event()
        self.eof = False
        #: What the sandbox may still be sent.
        self.credit = WINDOW
        self.credit_ready = asyncio.Event()
        self.credit_ready.set()
        self.task: asyncio.Task[None] | None = None


class Channel:
    """One sandbox's channel: start it, hand ``sandbox_fd`` to runsc (``--pass-fd``), call
    ``sandbox_started`` once runsc holds it, and ``close`` after the sandbox ended."""

    def __init__(self, proxy_socket: str, label: str = "") -> None:
        self.proxy_socket = proxy_socket
        self.label = label
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
            streams = list(self._streams.values())
            self._streams.clear()
            for stream in streams:
                if stream.task is not None:
                    stream.task.cancel()
            for stream in streams:
                if stream.task is not None:
                    with contextlib.suppress(BaseException):
                        await stream.task
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
            stream = self._streams[sid] = _Stream(sid)
            stream.task = asyncio.ensure_future(self._serve(stream))
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
            stream.inbound_size += len(payload)
            if stream.inbound_size > WINDOW:
                raise ProtocolError(f"stream {sid} sent more than its credit")
            stream.inbound.append(payload)
            stream.inbound_ready.set()
        elif kind == EOF:
            if stream.eof:
                raise ProtocolError(f"a second EOF on stream {sid}")
            stream.eof = True
            stream.inbound.append(None)
            stream.inbound_ready.set()
        elif kind == CREDIT:
            stream.credit += int.from_bytes(payload, "big")
            if stream.credit > WINDOW:
                raise ProtocolError(f"stream {sid} returned credit it was never given")
            stream.credit_ready.set()
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
        """One stream: a connection to the proxy, piped both ways until the proxy ends it."""
        writer: asyncio.StreamWriter | None = None
        upward: asyncio.Future[None] | None = None
        try:
            reader, writer = await asyncio.open_unix_connection(self.proxy_socket, limit=WINDOW)
            upward = asyncio.ensure_future(self._upward(stream, writer))
            await self._downward(stream, reader)
        except (ConnectionError, OSError):
            pass
        finally:
            if upward is not None:
                upward.cancel()
                with contextlib.suppress(BaseException):
                    await upward
            if writer is not None:
                writer.close()
            if self._streams.get(stream.sid) is stream:
                # The proxy ended the connection (or could not be reached): so does the sandbox.
                del self._streams[stream.sid]
                with contextlib.suppress(Exception):
                    await self._send(stream.sid, CLOSE)

    async def _upward(self, stream: _Stream, writer: asyncio.StreamWriter) -> None:
        """Sandbox to proxy; credit goes back as the proxy takes the bytes."""
        delivered = 0
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                if not stream.inbound:
                    stream.inbound_ready.clear()
                    await stream.inbound_ready.wait()
                    continue
                chunk = stream.inbound.popleft()
                if chunk is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                stream.inbound_size -= len(chunk)
                writer.write(chunk)
                await writer.drain()
                delivered += len(chunk)
                if delivered >= RETURN_AT:
                    await self._send(stream.sid, CREDIT, delivered.to_bytes(4, "big"))
                    delivered = 0

    async def _downward(self, stream: _Stream, reader: asyncio.StreamReader) -> None:
        """Proxy to sandbox, never more than the sandbox's credit; returns at the proxy's EOF."""
        while True:
            if stream.credit <= 0:
                stream.credit_ready.clear()
                await stream.credit_ready.wait()
                continue
            data = await reader.read(min(stream.credit, PAYLOAD_MAX))
            if not data:
                return
            stream.credit -= len(data)
            await self._send(stream.sid, DATA, data)
