"""The host side of a sandbox's network: an HTTP proxy that only its sandbox reaches.

The sandbox keeps ``--network=none``. Its relay (``sandboxed/egress_relay.py``)
serves tools on 127.0.0.1 inside and passes each connection over its channel
(``mux.py``), which hands it to this proxy (``EgressProxy.serve``) on the same
event loop, as a reader and a writer: no socket of the proxy's own is involved.
Given a path, the proxy also listens on a Unix socket there (mode 0600), where
each connection is served the same way; tests talk to it so. The proxy:

- takes ``CONNECT host:port`` (HTTPS and anything tunnelled) and plain HTTP in
  absolute-URI form (``GET http://host/path``), nothing else;
- reads at most ``MAX_HEAD`` bytes of request head, or answers 431 and closes;
- reads that head as strictly as RFC 9112 allows (see below) and answers 400 to
  anything two parsers could read differently, before connecting anywhere;
- asks the policy about the name and port, resolves the name itself, asks again
  about every address, and connects to an address it approved (a name that
  resolves differently a moment later changes nothing: it is never resolved
  twice);
- forwards exactly one plain-HTTP request per connection, with its body framed
  by Content-Length or chunked encoding, ``Host`` set from the URI and
  ``Connection: close``: a second request on a kept-alive connection, or a
  ``Host`` header naming another site (a 400), never reaches anyone;
- serves at most ``MAX_CONNECTIONS`` connections of one sandbox at a time and
  answers 503 beyond that, so one sandbox cannot exhaust the host;
- logs every decision with the word "gvisor", and records what it refused so
  that a result can list it (``blocked_since``).

All proxies of a process share one event loop in one daemon thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from .policy import Blocked, HostRule, NetworkPolicy, PolicyError, canonical_host, summarize

log = logging.getLogger("gvisor_magic.egress")

MAX_HEAD = 64 * 1024
MAX_CONNECTIONS = 256
HEAD_TIMEOUT = 30.0
RESOLVE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 15.0
#: A tunnel or response with no traffic either way for this long is closed.
IDLE_TIMEOUT = 300.0
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization",
               "proxy-authenticate", "te", "trailer", "upgrade", "host"}
_CHUNK = 65536
#: A chunk-size line, extensions and all.
_CHUNK_LINE = 4096


class _Loop:
    """The event loop every proxy of this process runs on (started on first use)."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._loop.is_closed():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, daemon=True,
                                          name="gvisor-magic-egress")
                thread.start()
                cls._loop = loop
            return cls._loop


class _Refusal(Exception):
    def __init__(self, status: int, reason: str, *, record: bool = True, hint: str = "") -> None:
        super().__init__(reason)
        self.status, self.reason, self.record, self.hint = status, reason, record, hint


class EgressProxy:
    """One sandbox's proxy, from ``start`` until ``close``: it serves each connection
    given to ``serve`` (a stream of the sandbox's channel), and with a ``socket_path``
    each connection made to a Unix socket it listens on there (mode 0600)."""

    def __init__(self, policy: NetworkPolicy, socket_path: str | None = None,
                 label: str = "") -> None:
        self.policy = policy
        self.socket_path = socket_path
        self.label = label or (os.path.basename(os.path.dirname(socket_path))
                               if socket_path else "")
        self.attempts: list[Blocked] = []
        #: Connections made, by ``host:port``.
        self.allowed: dict[str, int] = {}
        self._server: asyncio.base_events.Server | None = None
        self._active: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle (called from any thread) -------------------------------------

    def start(self) -> EgressProxy:
        self._loop = _Loop.get()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        future.result(timeout=15)
        log.info("gvisor: egress proxy for %s%s (%s)", self.label,
                 f" on {self.socket_path}" if self.socket_path else "", self.policy.describe())
        return self

    async def _start(self) -> None:
        if self.socket_path is None:
            return
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self.serve, path=self.socket_path, limit=MAX_HEAD, backlog=128)
        finally:
            os.umask(old)

    def close(self) -> None:
        """Stop listening, end every connection, remove the socket file; idempotent."""
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=15)
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._active):
            task.cancel()
        if self._active:
            await asyncio.wait(list(self._active), timeout=5)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def __enter__(self) -> EgressProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what happened ---------------------------------------------------------

    def mark(self) -> int:
        """Where the record stands now; pass it to ``blocked_since`` after a command."""
        return len(self.attempts)

    def blocked_since(self, mark: int = 0) -> list[Blocked]:
        return summarize(self.attempts[mark:])

    # -- one connection --------------------------------------------------------

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection, on the proxies' loop (``_Loop``), until it is over; the
        reader's limit must be ``MAX_HEAD``. The Unix server and the sandbox's
        channel (``mux.Channel``) both call it; it closes ``writer`` when done."""
        task = asyncio.current_task()
        if len(self._active) >= MAX_CONNECTIONS:
            log.warning("gvisor: egress refused a connection of %s: %d already open",
                        self.label, MAX_CONNECTIONS)
            await _answer(writer, 503, f"more than {MAX_CONNECTIONS} connections at once")
            writer.close()
            return
        assert task is not None
        self._active.add(task)
        upstream: asyncio.StreamWriter | None = None
        host, port = "", 0
        try:
            head = await _read_head(reader)
            if head.method == "CONNECT":
                host, port = parse_authority(head.target, None)
            else:
                host, port, path = _absolute_uri(head.target)
            # The destination first (a refusal of it is recorded, whatever else is wrong),
            # then the rest of the request, all before anything is resolved or connected.
            rule = self._decide_name(host, port, head.method)
            framing = check_request(head, host, port)
            up_reader, upstream = await self._open(host, port, head.method, rule)
            if head.method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
                await _pipe_both(reader, writer, up_reader, upstream)
            else:
                await _forward_one(head, path, host, port, framing,
                                   reader, up_reader, upstream, writer)
        except _Refusal as refusal:
            if refusal.record and host:
                self.attempts.append(Blocked(host, port, refusal.reason, refusal.hint))
            with contextlib.suppress(Exception):
                await _answer(writer, refusal.status,
                              f"{host}:{port}: {refusal.reason}" if host else refusal.reason)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError,
                asyncio.TimeoutError, OSError):
            pass
        finally:
            self._active.discard(task)
            for end in (upstream, writer):
                if end is not None:
                    end.close()

    def _decide_name(self, host: str, port: int, method: str) -> HostRule | None:
        """The policy on the name, before anything is resolved; the rule that allows it."""
        verdict, rule = self.policy.decide_name(host, port)
        if not verdict.allowed:
            log.warning("gvisor: egress blocked %s %s:%d for %s: %s", method, host, port,
                        self.label, verdict.reason)
            raise _Refusal(403, verdict.reason, hint=self.policy.hint(host, port))
        return rule

    async def _open(self, host: str, port: int, method: str, rule: HostRule | None
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Resolve, decide on every address, connect to one that was allowed."""
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("gvisor: egress could not resolve %s for %s: %s", host, self.label, exc)
            raise _Refusal(502, f"{host} could not be resolved on the host") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        approved, refusals = [], []
        for address in addresses:
            verdict = self.policy.decide_address(host, address, rule)
            (approved if verdict.allowed else refusals).append(
                address if verdict.allowed else verdict.reason)
        if not approved:
            reason = refusals[0] if refusals else f"{host} has no address"
            log.warning("gvisor: egress blocked %s %s:%d for %s: %s", method, host, port,
                        self.label, reason)
            raise _Refusal(403, reason, hint=self.policy.hint(host, port, addresses))
        last: Exception | None = None
        for address in approved:
            try:
                opened = await asyncio.wait_for(
                    asyncio.open_connection(address, port, limit=MAX_HEAD), CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as exc:
                last = exc
                continue
            log.info("gvisor: egress allowed %s %s:%d (%s) for %s", method, host, port,
                     address, self.label)
            key = f"{host}:{port}"
            self.allowed[key] = self.allowed.get(key, 0) + 1
            return opened
        log.warning("gvisor: egress could not connect to %s:%d for %s: %s", host, port,
                    self.label, last)
        raise _Refusal(502, f"could not connect to {host}:{port} ({last})", record=False)


# -- HTTP, as little as a proxy needs, read strictly ------------------------------------
#
# Request heads are read as RFC 9112 asks and nothing more lenient: a line ends with CRLF
# and nothing else (a bare CR or LF anywhere is refused, not read as a line end), no
# obsolete line folding, field names are tokens with no whitespace before the colon,
# field values hold no control characters, exactly one Host in HTTP/1.1 (at most one in
# HTTP/1.0 and in CONNECT) and it names what the request line names (checked once the
# policy has seen the destination), one Content-Length of digits or
# one Transfer-Encoding of exactly "chunked" (HTTP/1.1 only), never both. Each of these
# is a way to make the proxy and the upstream read different requests from one head
# (seen here 2026-12-07: ``X-A: a\nHost: evil.example`` reached the upstream as a second
# Host line). h11 0.16 was weighed against this and refused 36 of the 57 hostile heads
# in tests/unit/test_proxy_heads.py: it reads a bare LF as a line end, joins folded
# lines, lets Transfer-Encoding and Content-Length come together and knows nothing of a
# proxy's absolute-form target, so those checks would be needed on top of it anyway.

#: tchar (RFC 9110 section 5.6.2).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: What may not appear in a field value: controls other than HTAB, and DEL.
_NOT_IN_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: An absolute-form or authority-form target: visible ASCII only.
_TARGET = re.compile(rb"[\x21-\x7e]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")
#: ``host[:port]`` with an IPv6 literal in brackets.
_AUTHORITY = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\[\]:@/\\?#\s,]+)(?::([0-9]{1,5}))?")


@dataclass(frozen=True)
class RequestHead:
    """A request head that passed every check of ``parse_head``."""

    method: str
    target: str
    version: str
    #: (name as sent, value without its surrounding whitespace), in order.
    fields: tuple[tuple[str, str], ...]

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.fields if k.lower() == name]


def _bad(reason: str) -> _Refusal:
    return _Refusal(400, reason, record=False)


def parse_head(lines: Sequence[bytes]) -> RequestHead:
    """The request line and fields of one head, each line without its CRLF (the reader
    has made sure every line ended with CRLF and nothing else). Raises ``_Refusal``."""
    if not lines:
        raise _bad("an empty request")
    for line in lines:
        if b"\r" in line or b"\n" in line:
            raise _bad("a bare CR or LF in the request head")
    parts = lines[0].split(b" ")
    if (len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1])
            or not _VERSION.fullmatch(parts[2])):
        raise _bad("not an HTTP/1.0 or HTTP/1.1 request line")
    return RequestHead(parts[0].decode("ascii"), parts[1].decode("ascii"),
                       parts[2].decode("ascii"), tuple(_field(line) for line in lines[1:]))


def _field(line: bytes) -> tuple[str, str]:
    """One field line (of a head or a chunked body's trailers): (name, value)."""
    if line[:1] in (b" ", b"\t"):
        raise _bad("obsolete line folding (or whitespace before the first field)")
    name, sep, value = line.partition(b":")
    if not sep or not _TOKEN.fullmatch(name):
        raise _bad("a malformed field name (a token, then a colon, no whitespace)")
    value = value.strip(b" \t")
    if _NOT_IN_VALUE.search(value):
        raise _bad(f"a control character in the value of {name.decode()}")
    return name.decode("ascii"), value.decode("latin-1")


def parse_authority(text: str, default_port: int | None) -> tuple[str, int]:
    """``host:port`` (a CONNECT target, a Host value) as (canonical host, port); with
    ``default_port`` None the port must be there. Raises ``_Refusal``."""
    match = _AUTHORITY.fullmatch(text)
    port = default_port if match is None or match.group(2) is None else int(match.group(2))
    if match is None or port is None:
        raise _bad(f"not host:port: {text[:200]!r}")
    if not 0 < port < 65536:
        raise _bad(f"port out of range: {text[:200]!r}")
    try:
        return canonical_host(match.group(1)), port
    except PolicyError as exc:
        raise _Refusal(403, str(exc), record=False) from None


@dataclass(frozen=True)
class Framing:
    """How a plain-HTTP request's body ends: Content-Length bytes, or chunked, or none."""

    length: int = 0
    chunked: bool = False


def check_request(head: RequestHead, host: str, port: int) -> Framing:
    """What RFC 9112 asks of a request whose target names ``host:port``, beyond its
    grammar: Host, then how its body is framed. Raises ``_Refusal``."""
    hosts = head.values("host")
    if len(hosts) > 1:
        raise _bad("more than one Host field")
    # CONNECT may go without one: its Host is never forwarded, and clients that leave it
    # out of an HTTP/1.1 CONNECT exist (the tests' own raw probes do).
    if not hosts and head.version == "HTTP/1.1" and head.method != "CONNECT":
        raise _bad("an HTTP/1.1 request without Host")
    if hosts:
        # The port a Host leaves out is 80 for an http:// target (RFC 9110 section 4.2.1);
        # CONNECT's Host may leave it out too (its target says it).
        try:
            named = parse_authority(hosts[0], port if head.method == "CONNECT" else 80)
        except _Refusal:
            raise _bad(f"a malformed Host: {hosts[0][:200]!r}") from None
        if named != (host, port):
            raise _bad(f"Host {hosts[0][:200]!r} is not the request's target")
    lengths = head.values("content-length")
    encodings = head.values("transfer-encoding")
    if encodings and lengths:
        raise _bad("both Transfer-Encoding and Content-Length")
    if len(lengths) > 1 or len(encodings) > 1:
        raise _bad("more than one Content-Length or Transfer-Encoding")
    if encodings:
        if encodings[0].lower() != "chunked":
            raise _bad("a Transfer-Encoding other than chunked")
        if head.version != "HTTP/1.1" or head.method == "CONNECT":
            raise _bad("Transfer-Encoding in an HTTP/1.0 or CONNECT request")
        return Framing(chunked=True)
    if lengths:
        if not re.fullmatch(r"[0-9]{1,18}", lengths[0]):
            raise _bad(f"a malformed Content-Length: {lengths[0][:40]!r}")
        length = int(lengths[0])
        if length and head.method == "CONNECT":
            raise _bad("a CONNECT request with content")
        return Framing(length=length)
    return Framing()


async def _read_line(reader: asyncio.StreamReader, room: int) -> bytes:
    """One CRLF-ended line of at most ``room`` bytes, without its CRLF."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise _Refusal(431, f"request head over {MAX_HEAD} bytes", record=False) from None
    if len(line) > room:
        raise _Refusal(431, f"request head over {MAX_HEAD} bytes", record=False)
    if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
        raise _bad("a bare CR or LF in the request")
    return line[:-2]


async def _read_head(reader: asyncio.StreamReader) -> RequestHead:
    async def lines() -> list[bytes]:
        read: list[bytes] = []
        room = MAX_HEAD
        while True:
            line = await _read_line(reader, room)
            room -= len(line) + 2
            if not line:
                return read
            read.append(line)

    try:
        return parse_head(await asyncio.wait_for(lines(), HEAD_TIMEOUT))
    except asyncio.IncompleteReadError as exc:
        if len(exc.partial) >= MAX_HEAD:
            raise _Refusal(431, f"request head over {MAX_HEAD} bytes", record=False) from None
        raise


def _absolute_uri(target: str) -> tuple[str, int, str]:
    if not target.lower().startswith("http://"):
        raise _Refusal(400, "a proxy request names an absolute http:// URI "
                            "(or uses CONNECT)", record=False)
    try:
        parts = urlsplit(target)
        port = 80 if parts.port is None else parts.port
        hostname = parts.hostname or ""
    except ValueError:
        raise _Refusal(400, "malformed URI", record=False) from None
    if not 0 < port < 65536:
        raise _Refusal(400, f"port out of range: {target[:200]!r}", record=False)
    if "@" in parts.netloc:
        raise _Refusal(400, "credentials in a proxied URI", record=False)
    try:
        host = canonical_host(hostname)
    except PolicyError as exc:
        raise _Refusal(403, str(exc), record=False) from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return host, port, path


async def _answer(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    titles = {400: "Bad Request", 403: "Forbidden", 431: "Request Header Fields Too Large",
              502: "Bad Gateway", 503: "Service Unavailable"}
    body = f"gvisor-magic egress proxy: {reason}\n".encode("utf-8", "replace")
    writer.write(f"HTTP/1.1 {status} {titles.get(status, 'Error')}\r\n"
                 f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
                 "Connection: close\r\n\r\n".encode() + body)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.drain(), 5)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        chunk = await asyncio.wait_for(reader.read(_CHUNK), IDLE_TIMEOUT)
        if not chunk:
            break
        writer.write(chunk)
        await writer.drain()


async def _pipe_both(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
                     up_r: asyncio.StreamReader, up_w: asyncio.StreamWriter) -> None:
    async def outbound() -> None:
        with contextlib.suppress(Exception):
            await _copy(client_r, up_w)
            if up_w.can_write_eof():
                up_w.write_eof()

    sending = asyncio.ensure_future(outbound())
    try:
        await _copy(up_r, client_w)
    finally:
        sending.cancel()
        with contextlib.suppress(BaseException):
            await sending


async def _forward_one(head: RequestHead, path: str, host: str, port: int, framing: Framing,
                       client_r: asyncio.StreamReader, up_r: asyncio.StreamReader,
                       up_w: asyncio.StreamWriter, client_w: asyncio.StreamWriter) -> None:
    shown = f"[{host}]" if ":" in host else host
    authority = shown if port == 80 else f"{shown}:{port}"
    # Fields the client's Connection names are its own hop's (RFC 9110 section 7.6.1), but
    # never the body's framing: the body is forwarded as it was framed.
    dropped = _HOP_BY_HOP | ({token.strip().lower() for value in head.values("connection")
                              for token in value.split(",")}
                             - {"content-length", "transfer-encoding"})
    lines = [f"{head.method} {path} {head.version}", f"Host: {authority}"]
    lines += [f"{k}: {v}" for k, v in head.fields if k.lower() not in dropped]
    lines.append("Connection: close")
    up_w.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    remaining = framing.length
    while remaining:
        chunk = await asyncio.wait_for(client_r.read(min(remaining, _CHUNK)), IDLE_TIMEOUT)
        if not chunk:
            raise asyncio.IncompleteReadError(b"", remaining)
        up_w.write(chunk)
        await up_w.drain()
        remaining -= len(chunk)
    if framing.chunked:
        await _forward_chunked(client_r, up_w)
    await up_w.drain()
    # One request per connection: whatever else the client sends is never read.
    await _copy(up_r, client_w)


async def _forward_chunked(client_r: asyncio.StreamReader, up_w: asyncio.StreamWriter) -> None:
    """A chunked body, each size line, chunk end and trailer read as strictly as a head."""
    while True:
        line = await asyncio.wait_for(_read_line(client_r, _CHUNK_LINE), IDLE_TIMEOUT)
        digits = line.split(b";")[0].rstrip(b" \t")
        if not re.fullmatch(rb"[0-9A-Fa-f]{1,8}", digits):
            raise _bad("bad chunk size")
        size = int(digits, 16)
        up_w.write(digits + b"\r\n")  # without extensions another reader may parse
        if size == 0:
            room = MAX_HEAD
            while True:  # trailers, each a well-formed field, then the blank line
                trailer = await asyncio.wait_for(_read_line(client_r, room), IDLE_TIMEOUT)
                room -= len(trailer) + 2
                if trailer:
                    _field(trailer)
                up_w.write(trailer + b"\r\n")
                if not trailer:
                    await up_w.drain()
                    return
        data = await asyncio.wait_for(client_r.readexactly(size + 2), IDLE_TIMEOUT)
        if data[-2:] != b"\r\n":
            raise _bad("a chunk longer than its size")
        up_w.write(data)
        await up_w.drain()
