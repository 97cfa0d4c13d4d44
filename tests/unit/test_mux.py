"""The network channel's protocol (``egress/mux.py`` on the host, ``sandboxed/egress_relay.py``
inside), with a handler on the channel's loop standing in for the proxy: framing, credit,
hostile frames, both ends talking to each other in this process, and the real proxy
served through the channel. No sandbox here."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from gvisor_magic.backends.init import RELAY_SOURCE
from gvisor_magic.egress import mux
from gvisor_magic.egress.policy import NetworkPolicy
from gvisor_magic.egress.proxy import MAX_HEAD, EgressProxy

TIMEOUT = 20.0


def relay_namespace() -> dict:
    """The relay's names, as the init and the agent get them (its source, executed)."""
    namespace: dict = {"__name__": "relay_under_test"}
    exec(compile(RELAY_SOURCE, "egress_relay.py", "exec"), namespace)
    return namespace


def wait_for(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class FakeProxy:
    """Stands in for the proxy's ``serve`` (on the channel's loop): echoes each connection
    until its EOF (then closes it), or with ``blast`` writes that many bytes at once and
    closes; with ``hold`` reads nothing until ``go`` is called."""

    def __init__(self, blast: int = 0, hold: bool = False) -> None:
        self.blast = blast
        self.connections = 0
        self.closed = 0
        self.received = 0
        self._hold = hold
        self._go: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self._hold:
                self._loop, self._go = asyncio.get_running_loop(), asyncio.Event()
                await self._go.wait()
            if self.blast:
                writer.write(b"x" * self.blast)
                await writer.drain()
            else:
                while data := await reader.read(65536):
                    self.received += len(data)
                    writer.write(data)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            self.closed += 1

    def go(self) -> None:
        """A held connection starts reading."""
        wait_for(lambda: self._go is not None, "the held connection to be served")
        assert self._loop is not None and self._go is not None
        self._loop.call_soon_threadsafe(self._go.set)


@pytest.fixture
def proxy() -> FakeProxy:
    return FakeProxy()


@contextlib.contextmanager
def channel_to(proxy: FakeProxy | EgressProxy) -> Iterator[tuple[mux.Channel, socket.socket]]:
    """A started host channel, and the sandbox's end of it (as a plain socket)."""
    channel = mux.Channel(proxy.serve, "unit").start()
    sandbox = socket.socket(fileno=os.dup(channel.sandbox_fd))
    channel.sandbox_started()
    sandbox.settimeout(TIMEOUT)
    try:
        yield channel, sandbox
    finally:
        channel.close()
        sandbox.close()


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"the channel ended after {len(data)} of {size} bytes")
        data += chunk
    return data


def read_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    sid, kind, length = mux.parse_header(read_exactly(sock, mux.HEADER))
    return sid, kind, read_exactly(sock, length) if length else b""


def test_both_ends_agree_on_the_protocol() -> None:
    relay = relay_namespace()
    assert (relay["MUX_OPEN"], relay["MUX_DATA"], relay["MUX_EOF"], relay["MUX_CLOSE"],
            relay["MUX_CREDIT"]) == (mux.OPEN, mux.DATA, mux.EOF, mux.CLOSE, mux.CREDIT)
    assert relay["MUX_HEADER"] == mux.HEADER
    assert relay["MUX_PAYLOAD_MAX"] == mux.PAYLOAD_MAX
    assert relay["MUX_WINDOW"] == mux.WINDOW
    assert relay["MUX_RETURN_AT"] <= relay["MUX_WINDOW"]  # else credit could never come back
    assert relay["RELAY_CONNECTIONS_MAX"] == mux.STREAMS_MAX
    assert relay["parse_egress"]("3\tlocalhost") == {"socket": 3, "no_proxy": "localhost"}
    assert relay["parse_egress"]("\tlocalhost") == {"socket": None, "no_proxy": "localhost"}


def test_frames_and_their_headers() -> None:
    data = mux.frame(7, mux.DATA, b"abc")
    assert data == b"\0\0\0\x07\x02\0\0\0\x03abc"
    assert mux.parse_header(data[:mux.HEADER]) == (7, mux.DATA, 3)
    assert mux.parse_header(mux.frame(1, mux.CREDIT, (5).to_bytes(4, "big"))[:9]) == (
        1, mux.CREDIT, 4)
    with pytest.raises(ValueError):
        mux.frame(1, mux.DATA, b"x" * (mux.PAYLOAD_MAX + 1))
    bad = [b"\0\0\0\x01\x09\0\0\0\0",                     # unknown kind
           b"\0\0\0\x01\x02" + (mux.PAYLOAD_MAX + 1).to_bytes(4, "big"),  # over the maximum
           b"\0\0\0\x01\x01\0\0\0\x01",                   # OPEN with a payload
           b"\0\0\0\x01\x05\0\0\0\x02"]                   # WINDOW of 2 bytes
    for head in bad:
        with pytest.raises(mux.ProtocolError):
            mux.parse_header(head)


def test_a_stream_reaches_the_proxy_and_ends_when_it_does(proxy) -> None:
    with channel_to(proxy) as (channel, sandbox):
        sandbox.sendall(mux.frame(1, mux.OPEN) + mux.frame(1, mux.DATA, b"hello")
                        + mux.frame(1, mux.EOF))
        assert read_frame(sandbox) == (1, mux.DATA, b"hello")
        assert read_frame(sandbox) == (1, mux.CLOSE, b"")  # the proxy closed after our EOF
        wait_for(lambda: proxy.closed == 1, "the proxy's connection to end")
        assert channel.error is None and channel.opened == 1
        # Frames still in flight for a stream that is over are dropped, not an error.
        sandbox.sendall(mux.frame(1, mux.DATA, b"late") + mux.frame(1, mux.CREDIT,
                                                                    (10).to_bytes(4, "big")))
        sandbox.sendall(mux.frame(2, mux.OPEN) + mux.frame(2, mux.DATA, b"again"))
        assert read_frame(sandbox) == (2, mux.DATA, b"again")
        assert channel.error is None


def test_the_host_never_sends_more_than_the_credit_and_other_streams_go_on() -> None:
    blaster = FakeProxy(blast=1 << 20)
    with channel_to(blaster) as (channel, sandbox):
        sandbox.sendall(mux.frame(1, mux.OPEN))
        got = 0
        while got < mux.WINDOW:
            sid, kind, payload = read_frame(sandbox)
            assert (sid, kind) == (1, mux.DATA)
            got += len(payload)
        assert got == mux.WINDOW
        # Stream 1 is out of credit: stream 2 still gets through, and nothing more of
        # stream 1 arrives on the way.
        sandbox.sendall(mux.frame(2, mux.OPEN))
        sid, kind, payload = read_frame(sandbox)
        assert (sid, kind) == (2, mux.DATA)
        sandbox.sendall(mux.frame(1, mux.CREDIT, (70000).to_bytes(4, "big")))
        more = {1: 0, 2: len(payload)}
        while more[1] < 70000:
            sid, kind, payload = read_frame(sandbox)
            if kind == mux.DATA:
                more[sid] += len(payload)
        assert more[1] == 70000
        assert channel.error is None


HOSTILE = {
    "an unknown kind": mux.frame(1, mux.OPEN) + b"\0\0\0\x01\x09\0\0\0\0",
    "an oversized payload": b"\0\0\0\x01\x02\xff\xff\xff\xff",
    "more data than the credit": mux.frame(1, mux.OPEN) + b"".join(
        mux.frame(1, mux.DATA, b"x" * mux.PAYLOAD_MAX) for _ in range(5)),
    "an id that does not grow": mux.frame(5, mux.OPEN) + mux.frame(5, mux.OPEN),
    "data for a stream never opened": mux.frame(9, mux.DATA, b"x"),
    "credit never given": mux.frame(1, mux.OPEN) + mux.frame(1, mux.CREDIT,
                                                               (1).to_bytes(4, "big")),
    "data after EOF": mux.frame(1, mux.OPEN) + mux.frame(1, mux.EOF)
    + mux.frame(1, mux.DATA, b"x"),
    "too many streams": b"".join(mux.frame(i, mux.OPEN) for i in range(1, mux.STREAMS_MAX + 2)),
    "a frame cut short": mux.frame(1, mux.OPEN) + b"\0\0\0\x01\x02\0\0\0\x10abc",
}


def send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_frame_ends_the_channel_and_nothing_else(proxy, name) -> None:
    with channel_to(proxy) as (channel, sandbox):
        # A thread, not sendall here: the host may stop reading before all of it arrives.
        sender = threading.Thread(target=send_quietly, args=(sandbox, HOSTILE[name]),
                                  daemon=True)
        sender.start()
        if name == "a frame cut short":
            sender.join(TIMEOUT)
            sandbox.shutdown(socket.SHUT_WR)
        try:
            while sandbox.recv(65536):
                pass  # what the host sent before it ended the channel
        except ConnectionResetError:
            pass  # it ended with our frames unread
        assert channel.error, channel.error
        sender.join(TIMEOUT)
        wait_for(lambda: proxy.closed == proxy.connections, "the proxy's connections")
    # The host still works: a new channel serves as before.
    with channel_to(proxy) as (_channel, sandbox):
        sandbox.sendall(mux.frame(1, mux.OPEN) + mux.frame(1, mux.DATA, b"ok"))
        assert read_frame(sandbox) == (1, mux.DATA, b"ok")


def test_close_ends_every_stream_and_leaves_nothing(proxy) -> None:
    with channel_to(proxy) as (channel, sandbox):
        sandbox.sendall(b"".join(mux.frame(i, mux.OPEN) + mux.frame(i, mux.DATA, b"hi")
                                 for i in range(1, 21)))
        for _ in range(20):
            assert read_frame(sandbox)[1] == mux.DATA
        started = time.monotonic()
        channel.close()
        assert time.monotonic() - started < 5
        assert sandbox.recv(10) == b""
        wait_for(lambda: proxy.closed == 20, "the proxy's connections to close")
        channel.close()  # idempotent


@contextlib.contextmanager
def relay_end(sandbox: socket.socket) -> Iterator[tuple[dict, object]]:
    """The relay's channel (the sandbox's code) on the sandbox's end of a host channel."""
    relay = relay_namespace()
    fd = os.dup(sandbox.fileno())
    sandbox.close()
    os.set_inheritable(fd, True)  # as runsc hands it over
    inside = relay["_MuxChannel"](fd)
    with pytest.raises(OSError):
        os.fstat(fd)  # moved off the number it came with
    assert not os.get_inheritable(inside.sock.fileno())
    threading.Thread(target=inside.read_loop, daemon=True).start()
    yield relay, inside


def serve(relay: dict, inside: object) -> socket.socket:
    """A connection accepted by the relay: returns the tool's end."""
    tool, accepted = socket.socketpair()
    relay["_RELAY"]["open"] += 1
    client = relay["_socket"].socket(fileno=accepted.detach())
    threading.Thread(target=relay["_mux_serve"], args=(inside, client), daemon=True).start()
    tool.settimeout(TIMEOUT)
    return tool


def test_the_relay_and_the_host_carry_many_streams_and_a_slow_one_stalls_only_itself(
        proxy) -> None:
    with channel_to(proxy) as (channel, sandbox):
        with relay_end(sandbox) as (relay, inside):
            slow = serve(relay, inside)
            # Echoed back, and nobody reads it for now: its credit runs out, its sender waits.
            slow_sender = threading.Thread(target=slow.sendall, args=(b"s" * (3 << 20),),
                                           daemon=True)
            slow_sender.start()
            tools = [serve(relay, inside) for _ in range(20)]
            payloads = [os.urandom(300_000) for _ in tools]
            senders = [threading.Thread(target=t.sendall, args=(p,), daemon=True)
                       for t, p in zip(tools, payloads, strict=True)]
            for sender in senders:
                sender.start()
            for tool, payload in zip(tools, payloads, strict=True):
                assert read_exactly(tool, len(payload)) == payload
            for sender in senders:
                sender.join(TIMEOUT)
            for tool in tools:
                tool.shutdown(socket.SHUT_WR)  # EOF: the proxy ends, so does the stream
                assert tool.recv(10) == b""
                tool.close()
            assert read_exactly(slow, 3 << 20) == b"s" * (3 << 20)  # all of its own, late
            slow_sender.join(TIMEOUT)
            slow.close()
            wait_for(lambda: relay["_RELAY"]["open"] == 0, "the relay's connections to end")
            assert channel.error is None and channel.opened == 21
        channel.close()
        wait_for(lambda: not inside.alive, "the relay to see the channel end")


def test_a_proxy_that_reads_nothing_gets_no_more_than_its_bound() -> None:
    """Credit goes back only while the proxy's reader is under its limit: a proxy that
    reads nothing holds at most twice its limit and one window, and the sandbox's sender
    waits; once it reads, everything arrives."""
    held = FakeProxy(hold=True)
    total = 2 << 20
    with channel_to(held) as (channel, sandbox):
        credit = {"left": mux.WINDOW, "echoed": b""}
        changed = threading.Condition()
        sending = threading.Lock()  # two threads send: whole frames, one at a time

        def send(data: bytes) -> None:
            with sending:
                sandbox.sendall(data)

        def frames() -> None:  # the sandbox's reader: credit and the echo
            with contextlib.suppress(OSError, EOFError):
                while True:
                    _sid, kind, payload = read_frame(sandbox)
                    with changed:
                        if kind == mux.CREDIT:
                            credit["left"] += int.from_bytes(payload, "big")
                        elif kind == mux.DATA:
                            credit["echoed"] += payload
                            send(mux.frame(1, mux.CREDIT, len(payload).to_bytes(4, "big")))
                        changed.notify_all()

        reading = threading.Thread(target=frames, daemon=True)
        reading.start()
        send(mux.frame(1, mux.OPEN))

        def held_back() -> bool:  # the sandbox used all its credit, and gets none back
            stream = channel._streams.get(1)
            return (stream is not None and stream.reading_paused
                    and stream.unreturned == mux.WINDOW)

        sent = 0
        while sent < total:
            wait_for(lambda: credit["left"] > 0 or held_back(),
                     "credit, or the host to hold it back")
            with changed:
                if credit["left"] <= 0:
                    break
                size = min(credit["left"], 65536, total - sent)
                credit["left"] -= size
            send(mux.frame(1, mux.DATA, b"u" * size))
            sent += size
        assert sent < total, "the proxy read nothing, yet all of it was taken"
        assert sent <= 2 * MAX_HEAD + mux.WINDOW
        assert held.received == 0
        held.go()
        while sent < total:
            with changed:
                assert changed.wait_for(lambda: credit["left"] > 0, TIMEOUT)
                size = min(credit["left"], 65536, total - sent)
                credit["left"] -= size
            send(mux.frame(1, mux.DATA, b"u" * size))
            sent += size
        send(mux.frame(1, mux.EOF))
        with changed:
            assert changed.wait_for(lambda: len(credit["echoed"]) == total, TIMEOUT)
        assert credit["echoed"] == b"u" * total and channel.error is None
    reading.join(TIMEOUT)
    assert not reading.is_alive()


class Upstream:
    """A loopback HTTP server in a thread: answers each request with ``size`` bytes of
    body, and counts the connections it got."""

    def __init__(self, size: int = 3) -> None:
        self.size = size
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.authority = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.reached = 0
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.reached += 1
            self._conns.append(conn)
            thread = threading.Thread(target=self._answer, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _answer(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % self.size)
            block = b"d" * 65536
            left = self.size
            while left:
                left -= conn.send(block[:left])
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._accepting.join(TIMEOUT)
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(TIMEOUT)
        for conn in self._conns:
            conn.close()


@contextlib.contextmanager
def proxied(upstream: Upstream) -> Iterator[tuple[EgressProxy, mux.Channel, dict, object]]:
    """The real proxy, allowing only ``upstream``, served through a channel and the relay."""
    proxy = EgressProxy(NetworkPolicy.parse([upstream.authority]), label="unit").start()
    try:
        with channel_to(proxy) as (channel, sandbox), relay_end(sandbox) as (relay, inside):
            yield proxy, channel, relay, inside
            channel.close()
            wait_for(lambda: not inside.alive, "the relay to see the channel end")
    finally:
        proxy.close()


def until_closed(tool: socket.socket) -> bytes:
    data = b""
    while chunk := tool.recv(1 << 20):
        data += chunk
    return data


def test_the_proxy_serves_the_channels_streams_and_records_what_it_refused() -> None:
    upstream = Upstream()
    try:
        with proxied(upstream) as (proxy, channel, relay, inside):
            assert proxy.socket_path is None  # no socket of its own
            mark = proxy.mark()
            tool = serve(relay, inside)
            tool.sendall(f"GET http://{upstream.authority}/a HTTP/1.1\r\n"
                         f"Host: {upstream.authority}\r\n\r\n".encode())
            answer = until_closed(tool)
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nddd")
            tool.close()
            # A destination the policy refuses: a 403, in the proxy's record.
            tool = serve(relay, inside)
            tool.sendall(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n")
            assert until_closed(tool).startswith(b"HTTP/1.1 403 ")
            tool.close()
            assert [(b.host, b.port) for b in proxy.blocked_since(mark)] == [("127.0.0.1", 1)]
            # A hostile head: the proxy's own parser answers it, and no one is reached.
            tool = serve(relay, inside)
            tool.sendall(f"GET http://{upstream.authority}/ HTTP/1.1\r\nHost: "
                         f"{upstream.authority}\r\nX-A: a\nHost: evil.example\r\n\r\n".encode())
            assert until_closed(tool).startswith(b"HTTP/1.1 400 ")
            tool.close()
            assert upstream.reached == 1
            assert proxy.allowed == {upstream.authority: 1}
            assert channel.error is None and channel.opened == 3
    finally:
        upstream.close()


def test_a_download_nobody_reads_holds_a_bounded_buffer_and_stalls_only_itself() -> None:
    big = Upstream(size=16 << 20)
    try:
        with proxied(big) as (_proxy, channel, relay, inside):
            slow = serve(relay, inside)
            slow.sendall(f"GET http://{big.authority}/big HTTP/1.1\r\n"
                         f"Host: {big.authority}\r\n\r\n".encode())
            wait_for(lambda: channel._streams.get(1) is not None
                     and channel._streams[1].writing_paused, "the proxy to be told to wait")
            stream = channel._streams[1]
            # What the host holds of it: what the proxy wrote and may not send yet, at most
            # the writer's high mark and one of its writes.
            assert stream.outbound_size <= mux.WRITE_HIGH + 65536
            # Another stream goes on meanwhile.
            other = serve(relay, inside)
            other.sendall(f"GET http://{big.authority}/small HTTP/1.1\r\n"
                          f"Host: {big.authority}\r\n\r\n".encode())
            assert stream.outbound_size <= mux.WRITE_HIGH + 65536
            head, _, body = until_closed(slow).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert len(body) == 16 << 20
            slow.close()
            other.settimeout(TIMEOUT)
            assert len(until_closed(other).partition(b"\r\n\r\n")[2]) == 16 << 20
            other.close()
            assert channel.error is None
    finally:
        big.close()


def test_a_sandboxs_network_makes_nothing_on_disk_and_closes_everything(tmp_path) -> None:
    """The proxy has no socket: nothing is created in the run dir or anywhere else, and
    ``close`` ends the channel, the proxy and their streams."""
    from gvisor_magic.egress.sandbox import SandboxNetwork

    upstream = Upstream()
    network = SandboxNetwork(NetworkPolicy.parse([upstream.authority]), str(tmp_path), "unit")
    try:
        network.start()
        assert network.proxy is not None and network.proxy.socket_path is None
        assert list(tmp_path.iterdir()) == []
        assert network.run_args() == [f"--pass-fd={network.pass_fds[0]}:3"]
        sandbox = socket.socket(fileno=os.dup(network.pass_fds[0]))
        network.sandbox_started()
        with relay_end(sandbox) as (relay, inside):
            tool = serve(relay, inside)
            tool.sendall(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n")
            assert until_closed(tool).startswith(b"HTTP/1.1 403 ")
            tool.close()
            held = serve(relay, inside)  # an open tunnel, when close comes
            held.sendall(f"CONNECT {upstream.authority} HTTP/1.1\r\n\r\n".encode())
            assert held.recv(4096).startswith(b"HTTP/1.1 200 ")
            network.close()
            assert held.recv(10) == b""
            held.close()
            wait_for(lambda: not inside.alive, "the relay to see the channel end")
        assert [(b.host, b.port) for b in network.blocked()] == [("127.0.0.1", 1)]
        assert list(tmp_path.iterdir()) == []
    finally:
        network.close()
        upstream.close()
