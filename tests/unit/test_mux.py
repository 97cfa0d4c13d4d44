"""The network channel's protocol (``egress/mux.py`` on the host, ``sandboxed/egress_relay.py``
inside), with a local Unix-socket server standing in for the proxy: framing, credit,
hostile frames, and both ends talking to each other in this process. No sandbox here."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from gvisor_magic.backends.init import RELAY_SOURCE
from gvisor_magic.egress import mux

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
    """A Unix-socket server in a thread: echoes each connection until its EOF (then closes
    it), or with ``blast`` sends that many bytes at once and closes."""

    def __init__(self, blast: int = 0) -> None:
        self.directory = tempfile.mkdtemp(prefix="gmx-", dir="/tmp")
        self.path = os.path.join(self.directory, "p.sock")
        self.blast = blast
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(512)
        self.connections: list[socket.socket] = []
        self.closed = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with self._lock:
                self.connections.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            if self.blast:
                conn.sendall(b"x" * self.blast)
            else:
                while data := conn.recv(65536):
                    conn.sendall(data)
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        conn.close()
        with self._lock:
            self.closed += 1

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self._accepting.join(TIMEOUT)
        for conn in list(self.connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(TIMEOUT)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.rmdir(self.directory)


@pytest.fixture
def proxy() -> Iterator[FakeProxy]:
    server = FakeProxy()
    yield server
    server.close()


@contextlib.contextmanager
def channel_to(proxy: FakeProxy) -> Iterator[tuple[mux.Channel, socket.socket]]:
    """A started host channel, and the sandbox's end of it (as a plain socket)."""
    channel = mux.Channel(proxy.path, "unit").start()
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
    try:
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
    finally:
        blaster.close()


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
        wait_for(lambda: proxy.closed == len(proxy.connections), "the proxy's connections")
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
