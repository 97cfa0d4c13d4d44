"""Hostile request heads at the egress proxy: each is refused with a 400 and reaches no one.

The proxy (``gvisor_magic/egress/proxy.py``) runs for real, reached two ways: on a Unix
socket of its own, and as the sandbox reaches it, a tool's connection to the relay (the
sandbox's code, run here) carried as a stream of the channel (``egress/mux.py``) to the
proxy's ``serve``. Its only allowed destination is a listener on 127.0.0.1 that
this test drives itself, in this thread: a refused head must leave that listener's
accept queue empty (the proxy has closed the client by then, so a connection it had
made would already be queued). The well-formed controls show the same listener does
see what the proxy lets through, and exactly what it forwarded.

No runsc, no Docker, no name resolution: every destination is an IP literal.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from gvisor_magic.backends.init import RELAY_SOURCE
from gvisor_magic.egress import mux
from gvisor_magic.egress.policy import NetworkPolicy
from gvisor_magic.egress.proxy import EgressProxy

TIMEOUT = 10.0

#: (name, head): ``{a}`` is the allowed upstream's ``127.0.0.1:PORT``. Every head is
#: complete (ends with CRLF CRLF where its own line endings allow), so a proxy that took
#: it would go on to connect.
HOSTILE: list[tuple[str, bytes]] = [
    # line endings: only CRLF ends a line (RFC 9112 section 2.2)
    ("bare-lf-smuggles-a-host", b"GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\n"
                                b"X-A: a\nHost: evil.example\r\n\r\n"),
    ("bare-lf-smuggles-the-only-host", b"GET http://{a}/ HTTP/1.1\r\n"
                                       b"X-A: a\nHost: {a}\r\n\r\n"),
    ("bare-cr-smuggles-a-host", b"GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\n"
                                b"X-A: a\rHost: evil.example\r\n\r\n"),
    ("bare-lf-line-endings", b"GET http://{a}/ HTTP/1.1\nHost: {a}\n\n"),
    ("bare-lf-after-request-line", b"GET http://{a}/ HTTP/1.1\nHost: {a}\r\n\r\n"),
    ("bare-lf-ends-the-head", b"GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\n\n"),
    ("bare-cr-in-request-line", b"GET http://{a}/\r HTTP/1.1\r\nHost: {a}\r\n\r\n"),
    ("bare-cr-in-field-name", b"GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\nX\rA: b\r\n\r\n"),
    # obsolete line folding (section 5.2)
    ("obs-fold-space", b"GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\nX-A: a\r\n b\r\n\r\n"),
    ("obs-fold-tab", b"GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\nX-A: a\r\n\tb\r\n\r\n"),
    ("whitespace-before-first-field", b"GET http://{a}/ HTTP/1.1\r\n Host: evil.example\r\n"
                                      b"Host: {a}\r\n\r\n"),
    # Host (section 3.2)
    ("duplicate-host-same", b"GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\nHost: {a}\r\n\r\n"),
    ("duplicate-host-other", b"GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\n"
                             b"Host: evil.example\r\n\r\n"),
    ("host-other-site", b"GET http://{a}/ HTTP/1.1\r\nHost: evil.example\r\n\r\n"),
    ("host-other-port", b"GET http://{a}/ HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n"),
    ("host-empty", b"GET http://{a}/ HTTP/1.1\r\nHost:\r\n\r\n"),
    ("host-list", b"GET http://{a}/ HTTP/1.1\r\nHost: {a}, evil.example\r\n\r\n"),
    ("host-with-path", b"GET http://{a}/ HTTP/1.1\r\nHost: {a}/x\r\n\r\n"),
    ("host-missing-in-1.1", b"GET http://{a}/ HTTP/1.1\r\nX-A: a\r\n\r\n"),
    ("connect-host-other-site", b"CONNECT {a} HTTP/1.1\r\nHost: evil.example:443\r\n\r\n"),
    ("connect-duplicate-host", b"CONNECT {a} HTTP/1.1\r\nHost: {a}\r\nHost: {a}\r\n\r\n"),
    # field names are tokens, with no whitespace before the colon (section 5.1)
    ("space-before-colon", b"GET http://{a}/ HTTP/1.1\r\nHost : evil.example\r\n"
                           b"Host: {a}\r\n\r\n"),
    ("tab-before-colon", b"GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\nX-A\t: b\r\n\r\n"),
    ("space-in-field-name", b"GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\nX A: b\r\n\r\n"),
    ("separator-in-field-name", b"GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\nX(A): b\r\n\r\n"),
    ("quote-in-field-name", b"GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\n\"X\": b\r\n\r\n"),
    ("nul-in-field-name", b"GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\nX\x00A: b\r\n\r\n"),
    ("non-ascii-field-name", b"GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\nX\xe9: b\r\n\r\n"),
    ("empty-field-name", b"GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\n: b\r\n\r\n"),
    ("no-colon", b"GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\nX-A b\r\n\r\n"),
    # field values: visible characters, SP, HTAB, obs-text; no other control (section 5.5)
    ("nul-in-value", b"GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\nX-A: a\x00b\r\n\r\n"),
    ("control-in-value", b"GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\nX-A: a\x0bb\r\n\r\n"),
    ("del-in-value", b"GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\nX-A: a\x7fb\r\n\r\n"),
    # the request line (section 3)
    ("lowercase-connect", b"connect {a} HTTP/1.1\r\nHost: {a}\r\n\r\n"),
    ("separator-in-method", b"G(T http://{a}/ HTTP/1.1\r\nHost: {a}\r\n\r\n"),
    ("version-1.10", b"GET http://{a}/ HTTP/1.10\r\nHost: {a}\r\n\r\n"),
    ("version-suffix", b"GET http://{a}/ HTTP/1.1x\r\nHost: {a}\r\n\r\n"),
    ("version-lowercase", b"GET http://{a}/ http/1.1\r\nHost: {a}\r\n\r\n"),
    ("version-2", b"GET http://{a}/ HTTP/2.0\r\nHost: {a}\r\n\r\n"),
    ("four-words", b"GET http://{a}/ HTTP/1.1 x\r\nHost: {a}\r\n\r\n"),
    ("tab-separated", b"GET\thttp://{a}/\tHTTP/1.1\r\nHost: {a}\r\n\r\n"),
    ("nul-in-target", b"GET http://{a}/\x00 HTTP/1.1\r\nHost: {a}\r\n\r\n"),
    ("non-ascii-target", b"GET http://{a}/\xe9 HTTP/1.1\r\nHost: {a}\r\n\r\n"),
    ("empty-line-first", b"\r\nGET http://{a}/ HTTP/1.1\r\nHost: {a}\r\n\r\n"),
    # body framing (section 6)
    ("te-and-cl", b"POST http://{a}/ HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Length: 5\r\n\r\n"),
    ("cl-and-te", b"POST http://{a}/ HTTP/1.1\r\nHost: {a}\r\nContent-Length: 5\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n"),
    ("two-content-lengths", b"POST http://{a}/ HTTP/1.1\r\nHost: {a}\r\nContent-Length: 5\r\n"
                            b"Content-Length: 6\r\n\r\n"),
    ("two-equal-content-lengths", b"POST http://{a}/ HTTP/1.1\r\nHost: {a}\r\n"
                                  b"Content-Length: 5\r\nContent-Length: 5\r\n\r\n"),
    ("content-length-list", b"POST http://{a}/ HTTP/1.1\r\nHost: {a}\r\n"
                            b"Content-Length: 5, 5\r\n\r\n"),
    ("content-length-sign", b"POST http://{a}/ HTTP/1.1\r\nHost: {a}\r\n"
                            b"Content-Length: +5\r\n\r\n"),
    ("content-length-negative", b"POST http://{a}/ HTTP/1.1\r\nHost: {a}\r\n"
                                b"Content-Length: -5\r\n\r\n"),
    ("content-length-huge", b"POST http://{a}/ HTTP/1.1\r\nHost: {a}\r\n"
                            b"Content-Length: 99999999999999999999999\r\n\r\n"),
    ("te-gzip-chunked", b"POST http://{a}/ HTTP/1.1\r\nHost: {a}\r\n"
                        b"Transfer-Encoding: gzip, chunked\r\n\r\n"),
    ("te-chunked-twice", b"POST http://{a}/ HTTP/1.1\r\nHost: {a}\r\n"
                         b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("te-with-junk", b"POST http://{a}/ HTTP/1.1\r\nHost: {a}\r\n"
                     b"Transfer-Encoding: xchunked\r\n\r\n"),
    ("te-in-1.0", b"POST http://{a}/ HTTP/1.0\r\nHost: {a}\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n"),
    ("connect-with-te", b"CONNECT {a} HTTP/1.1\r\nHost: {a}\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n"),
]

#: Heads that are well-formed: (name, head, what the upstream must receive as its Host).
WELL_FORMED: list[tuple[str, bytes]] = [
    ("get-absolute", b"GET http://{a}/ok?q=1 HTTP/1.1\r\nHost: {a}\r\nX-A: a b\t c\r\n\r\n"),
    ("get-1.0-without-host", b"GET http://{a}/ok HTTP/1.0\r\nAccept: */*\r\n\r\n"),
    ("host-case-and-ows", b"GET http://{a}/ok HTTP/1.1\r\nhOsT:   {a}  \r\n\r\n"),
    ("obs-text-in-value", b"GET http://{a}/ok HTTP/1.1\r\nHost: {a}\r\nX-A: caf\xe9\r\n\r\n"),
    ("tchar-field-name", b"GET http://{a}/ok HTTP/1.1\r\nHost: {a}\r\n"
                         b"X!#$%&'*+-.^_`|~9: v\r\n\r\n"),
    ("post-content-length", b"POST http://{a}/ok HTTP/1.1\r\nHost: {a}\r\n"
                            b"Content-Length: 5\r\n\r\nhello"),
    ("post-chunked", b"POST http://{a}/ok HTTP/1.1\r\nHost: {a}\r\n"
                     b"Transfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
]


def _fill(template: bytes, authority: str) -> bytes:
    return template.replace(b"{a}", authority.encode())


# -- the proxy and its upstream, both real -----------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[socket.socket]:
    """A listener on 127.0.0.1 that nothing accepts from but the test itself."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield listener
    finally:
        listener.close()


class Entry:
    """A way to the proxy: ``connect()`` gives a connected client socket."""

    def __init__(self, proxy: EgressProxy, through_channel: bool) -> None:
        self.proxy = proxy
        self.channel: mux.Channel | None = None
        if through_channel:
            self.channel = mux.Channel(proxy.serve, "heads").start()
            fd = os.dup(self.channel.sandbox_fd)
            self.channel.sandbox_started()
            os.set_inheritable(fd, True)  # as runsc hands it over
            self.relay: dict = {"__name__": "relay_under_test"}
            exec(compile(RELAY_SOURCE, "egress_relay.py", "exec"), self.relay)
            self.inside = self.relay["_MuxChannel"](fd)
            self.reading = threading.Thread(target=self.inside.read_loop, daemon=True)
            self.reading.start()

    def connect(self) -> socket.socket:
        if self.channel is None:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.settimeout(TIMEOUT)
            client.connect(self.proxy.socket_path)
            return client
        tool, accepted = socket.socketpair()
        self.relay["_RELAY"]["open"] += 1
        served = self.relay["_socket"].socket(fileno=accepted.detach())
        threading.Thread(target=self.relay["_mux_serve"], args=(self.inside, served),
                         daemon=True).start()
        tool.settimeout(TIMEOUT)
        return tool

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.reading.join(TIMEOUT)
            assert not self.inside.alive


@pytest.fixture(scope="module", params=["unix-socket", "channel"])
def proxy(request: pytest.FixtureRequest, upstream: socket.socket) -> Iterator[Entry]:
    directory = tempfile.mkdtemp(prefix="gmh-", dir="/tmp")  # sockaddr_un: 108 bytes
    authority = _authority(upstream)
    through_channel = request.param == "channel"
    running = EgressProxy(NetworkPolicy.parse([authority]),
                          None if through_channel else os.path.join(directory, "p.sock"))
    entry = None
    try:
        entry = Entry(running.start(), through_channel)
        yield entry
    finally:
        if entry is not None:
            entry.close()
        running.close()
        shutil.rmtree(directory, ignore_errors=True)


def _authority(upstream: socket.socket) -> str:
    return f"127.0.0.1:{upstream.getsockname()[1]}"


def _read_until_close(client: socket.socket) -> bytes:
    deadline = time.monotonic() + TIMEOUT
    data = b""
    while True:
        client.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = client.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError:
            raise AssertionError(f"the proxy did not close within {TIMEOUT}s: {data!r}") from None
        if not chunk:
            return data
        data += chunk


def _queued(listener: socket.socket) -> list[socket.socket]:
    """Every connection waiting in the listener's accept queue, accepted now."""
    found = []
    listener.setblocking(False)
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return found
            found.append(conn)
    finally:
        listener.setblocking(True)


@contextlib.contextmanager
def _client(proxy: Entry) -> Iterator[socket.socket]:
    with proxy.connect() as client:
        yield client


@pytest.mark.parametrize(("name", "head"), HOSTILE, ids=[n for n, _ in HOSTILE])
def test_a_hostile_head_gets_400_and_reaches_no_one(
        proxy: Entry, upstream: socket.socket, name: str, head: bytes) -> None:
    for stale in _queued(upstream):  # a failed earlier case must not decide this one
        stale.close()
    with _client(proxy) as client:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            client.sendall(_fill(head, _authority(upstream)))
        answer = _read_until_close(client)
    reached = _queued(upstream)
    for conn in reached:
        conn.close()
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"Connection: close\r\n" in answer
    assert reached == [], f"{name}: the proxy connected upstream"


@pytest.mark.parametrize(("name", "head"), WELL_FORMED, ids=[n for n, _ in WELL_FORMED])
def test_a_well_formed_head_reaches_the_upstream_as_one_clean_request(
        proxy: Entry, upstream: socket.socket, name: str, head: bytes) -> None:
    """The control: the same listener sees what the proxy lets through."""
    for stale in _queued(upstream):
        stale.close()
    authority = _authority(upstream)
    with _client(proxy) as client:
        client.sendall(_fill(head, authority))
        upstream.settimeout(TIMEOUT)
        conn, _ = upstream.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            received = b""
            while b"\r\n\r\n" not in received:
                chunk = conn.recv(65536)
                assert chunk, f"the proxy hung up mid-head: {received!r}"
                received += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            conn.shutdown(socket.SHUT_WR)
            # the body, if any, then the proxy's close: nothing after the one request
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                received += chunk
        answer = _read_until_close(client)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"ok")
    head_part, _, body = received.partition(b"\r\n\r\n")
    lines = head_part.split(b"\r\n")
    assert lines[0].startswith((b"GET /ok", b"POST /ok"))
    assert all(b"\n" not in line and b"\r" not in line for line in lines)
    hosts = [line for line in lines if line.lower().startswith(b"host:")]
    assert hosts == [b"Host: " + authority.encode()]
    assert b"Connection: close" in lines
    if name == "post-content-length":
        assert body == b"hello"
    if name == "post-chunked":
        assert body == b"5\r\nhello\r\n0\r\n\r\n"


def test_connect_is_answered_and_tunnels(proxy: Entry, upstream: socket.socket) -> None:
    for stale in _queued(upstream):
        stale.close()
    authority = _authority(upstream)
    for head in (f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n",
                 f"CONNECT {authority} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                 f"CONNECT {authority} HTTP/1.1\r\n\r\n",
                 f"CONNECT {authority} HTTP/1.0\r\n\r\n"):  # Python 3.11's http.client
        with _client(proxy) as client:
            client.sendall(head.encode())
            upstream.settimeout(TIMEOUT)
            conn, _ = upstream.accept()
            with conn:
                answer = b""
                while b"\r\n\r\n" not in answer:
                    chunk = client.recv(1)
                    assert chunk, answer
                    answer += chunk
                assert answer == b"HTTP/1.1 200 Connection established\r\n\r\n"
                client.sendall(b"ping")
                conn.settimeout(TIMEOUT)
                assert conn.recv(4) == b"ping"


#: Chunked bodies read as strictly as heads: (name, body after the head, what the upstream
#: may have received of it at most).
HOSTILE_BODIES: list[tuple[str, bytes, bytes]] = [
    ("bare-lf-in-a-trailer", b"5\r\nhello\r\n0\r\nX-T: a\nHost: evil.example\r\n\r\n",
     b"5\r\nhello\r\n0\r\n"),
    ("obs-fold-in-a-trailer", b"5\r\nhello\r\n0\r\nX-T: a\r\n Host: evil.example\r\n\r\n",
     b"5\r\nhello\r\n0\r\nX-T: a\r\n"),
    ("chunk-longer-than-its-size", b"5\r\nhelloGET /smuggled HTTP/1.1\r\n\r\n0\r\n\r\n",
     b"5\r\n"),
    ("bare-lf-after-a-chunk-size", b"5\nhello\r\n0\r\n\r\n", b""),
]


@pytest.mark.parametrize(("name", "body", "at_most"), HOSTILE_BODIES,
                         ids=[n for n, _, _ in HOSTILE_BODIES])
def test_a_hostile_chunked_body_is_cut_where_it_goes_wrong(
        proxy: Entry, upstream: socket.socket, name: str, body: bytes,
        at_most: bytes) -> None:
    for stale in _queued(upstream):
        stale.close()
    authority = _authority(upstream)
    head = (f"POST http://{authority}/c HTTP/1.1\r\nHost: {authority}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    with _client(proxy) as client:
        client.sendall(head + body)
        upstream.settimeout(TIMEOUT)
        conn, _ = upstream.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            received = b""
            while True:  # until the proxy hangs up on the upstream
                chunk = conn.recv(65536)
                if not chunk:
                    break
                received += chunk
        answer = _read_until_close(client)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    forwarded = received.partition(b"\r\n\r\n")[2]
    assert at_most.startswith(forwarded), forwarded
    assert b"evil" not in received and b"smuggled" not in received
