"""The host side of a sandbox's network: an HTTP proxy on a Unix socket only it sees.

The sandbox keeps ``--network=none``. Its relay (``sandboxed/egress_relay.py``)
serves tools on 127.0.0.1 inside and passes each connection through the socket
(``runsc --host-uds=open``) to this proxy, which:

- takes ``CONNECT host:port`` (HTTPS and anything tunnelled) and plain HTTP in
  absolute-URI form (``GET http://host/path``), nothing else;
- reads at most ``MAX_HEAD`` bytes of request head, or answers 431 and closes;
- asks the policy about the name and port, resolves the name itself, asks again
  about every address, and connects to an address it approved (a name that
  resolves differently a moment later changes nothing: it is never resolved
  twice);
- forwards exactly one plain-HTTP request per connection, with its body framed
  by Content-Length or chunked encoding, ``Host`` set from the URI and
  ``Connection: close``: a second request on a kept-alive connection, or a
  ``Host`` header naming another site, never reaches anyone;
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
from urllib.parse import urlsplit

from .policy import Blocked, NetworkPolicy, PolicyError, canonical_host, summarize

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
    def __init__(self, status: int, reason: str, *, record: bool = True) -> None:
        super().__init__(reason)
        self.status, self.reason, self.record = status, reason, record


class EgressProxy:
    """One sandbox's proxy, listening on ``socket_path`` (mode 0600) until ``close``."""

    def __init__(self, policy: NetworkPolicy, socket_path: str, label: str = "") -> None:
        self.policy = policy
        self.socket_path = socket_path
        self.label = label or os.path.basename(os.path.dirname(socket_path))
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
        log.info("gvisor: egress proxy for %s on %s (%s)", self.label, self.socket_path,
                 self.policy.describe())
        return self

    async def _start(self) -> None:
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=self.socket_path, limit=MAX_HEAD, backlog=128)
        finally:
            os.umask(old)

    def close(self) -> None:
        """Stop listening, end every connection, remove the socket file; idempotent."""
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=15)
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

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
            method, target, version, headers = await _read_head(reader)
            if method == "CONNECT":
                host, port = _authority(target)
            else:
                host, port, path = _absolute_uri(target)
            up_reader, upstream = await self._open(host, port, method)
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
                await _pipe_both(reader, writer, up_reader, upstream)
            else:
                await _forward_one(method, path, version, headers, host, port,
                                   reader, up_reader, upstream, writer)
        except _Refusal as refusal:
            if refusal.record and host:
                hint = self.policy.hint(host, port) if refusal.status == 403 else ""
                self.attempts.append(Blocked(host, port, refusal.reason, hint))
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

    async def _open(self, host: str, port: int, method: str
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Decide, resolve, decide again, connect: the policy's whole path."""
        verdict, rule = self.policy.decide_name(host, port)
        if not verdict.allowed:
            log.warning("gvisor: egress blocked %s %s:%d for %s: %s", method, host, port,
                        self.label, verdict.reason)
            raise _Refusal(403, verdict.reason)
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
            raise _Refusal(403, reason)
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


# -- HTTP, as little as a proxy needs -------------------------------------------------


async def _read_head(reader: asyncio.StreamReader
                     ) -> tuple[str, str, str, list[tuple[str, str]]]:
    try:
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
    except asyncio.LimitOverrunError:
        raise _Refusal(431, f"request head over {MAX_HEAD} bytes", record=False) from None
    except asyncio.IncompleteReadError as exc:
        if len(exc.partial) >= MAX_HEAD:
            raise _Refusal(431, f"request head over {MAX_HEAD} bytes", record=False) from None
        raise
    lines = raw.decode("latin-1")[:-4].split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _Refusal(400, "not an HTTP/1.x request line", record=False)
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[:1] in (" ", "\t"):
            raise _Refusal(400, "malformed header line", record=False)
        headers.append((name, value.strip()))
    return parts[0].upper(), parts[1], parts[2], headers


def _authority(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise _Refusal(400, f"CONNECT needs host:port, got {target[:200]!r}", record=False)
    try:
        return canonical_host(host), int(port)
    except PolicyError as exc:
        raise _Refusal(403, str(exc), record=False) from None


def _absolute_uri(target: str) -> tuple[str, int, str]:
    if not target.lower().startswith("http://"):
        raise _Refusal(400, "a proxy request names an absolute http:// URI "
                            "(or uses CONNECT)", record=False)
    try:
        parts = urlsplit(target)
        port = parts.port or 80
        hostname = parts.hostname or ""
    except ValueError:
        raise _Refusal(400, "malformed URI", record=False) from None
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


async def _forward_one(method: str, path: str, version: str, headers: list[tuple[str, str]],
                       host: str, port: int, client_r: asyncio.StreamReader,
                       up_r: asyncio.StreamReader, up_w: asyncio.StreamWriter,
                       client_w: asyncio.StreamWriter) -> None:
    lengths = {v for k, v in headers if k.lower() == "content-length"}
    encodings = [v.strip().lower() for k, v in headers if k.lower() == "transfer-encoding"]
    if encodings and encodings != ["chunked"]:
        raise _Refusal(400, "unsupported Transfer-Encoding (only chunked)", record=False)
    chunked = bool(encodings)
    if (chunked and lengths) or len(lengths) > 1:
        raise _Refusal(400, "ambiguous request body framing", record=False)
    if lengths and not next(iter(lengths)).isdigit():
        raise _Refusal(400, "bad Content-Length", record=False)
    shown = f"[{host}]" if ":" in host else host
    authority = shown if port == 80 else f"{shown}:{port}"
    head = [f"{method} {path} {version}", f"Host: {authority}"]
    head += [f"{k}: {v}" for k, v in headers if k.lower() not in _HOP_BY_HOP]
    head.append("Connection: close")
    up_w.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    if lengths:
        remaining = int(next(iter(lengths)))
        while remaining:
            chunk = await asyncio.wait_for(client_r.read(min(remaining, _CHUNK)), IDLE_TIMEOUT)
            if not chunk:
                raise asyncio.IncompleteReadError(b"", remaining)
            up_w.write(chunk)
            await up_w.drain()
            remaining -= len(chunk)
    elif chunked:
        await _forward_chunked(client_r, up_w)
    await up_w.drain()
    # One request per connection: whatever else the client sends is never read.
    await _copy(up_r, client_w)


async def _forward_chunked(client_r: asyncio.StreamReader, up_w: asyncio.StreamWriter) -> None:
    while True:
        line = await asyncio.wait_for(client_r.readuntil(b"\r\n"), IDLE_TIMEOUT)
        digits = line[:-2].split(b";")[0]
        if not re.fullmatch(rb"[0-9A-Fa-f]{1,8}", digits):
            raise _Refusal(400, "bad chunk size", record=False)
        size = int(digits, 16)
        up_w.write(digits + b"\r\n")  # as read, without extensions another reader may parse
        if size == 0:
            while True:  # trailers, then the blank line
                trailer = await asyncio.wait_for(client_r.readuntil(b"\r\n"), IDLE_TIMEOUT)
                up_w.write(trailer)
                if trailer == b"\r\n":
                    await up_w.drain()
                    return
        data = await asyncio.wait_for(client_r.readexactly(size + 2), IDLE_TIMEOUT)
        up_w.write(data)
        await up_w.drain()
