"""The sandbox's end of its network: an HTTP proxy address on 127.0.0.1 for its tools.

Its source is put in front of the init's or the agent's (both passed to the
sandbox's Python with ``-I -S -c``), so it uses only built-in modules and
defines names only (all of its own start with ``_mux``, ``MUX_``, ``_relay`` or
``RELAY_``, apart from the few the init and the agent call).

``start_relay(config)`` listens on an ephemeral port of the sandbox's own
loopback, serves it from threads of the process that calls it (PID 1), and
returns the environment that points the usual tools at it.

With ``config["socket"]`` (the number of a descriptor the host gave PID 1 with
``runsc run --pass-fd``: one end of a host socket pair, the only way out of the
sandbox) every accepted connection becomes one stream of a multiplexed channel
over that socket, and the host's end (``gvisor_magic/egress/mux.py``) passes it
to the sandbox's own proxy, which alone decides where it may go. The sandbox
never connects to any host socket by path: runsc runs without ``--host-uds``.
The descriptor is moved to a close-on-exec number at once, so no command ever
inherits it.

Without it the network is off: each connection gets a 403 that says so, and
the destination it asked for is kept in ``ATTEMPTS`` (what the sandbox reports
there is only ever shown, never trusted).

The channel's frames: ``stream id`` (4 bytes, big-endian), ``kind`` (1 byte),
``length`` (4 bytes, big-endian), then ``length`` bytes of payload (at most
``MUX_PAYLOAD_MAX``). Kinds:

- OPEN (sandbox to host): a new stream; ids only ever grow;
- DATA: bytes of the stream, never more than the receiver's credit;
- EOF: the sender sends no more on this stream (a half-close);
- CLOSE: the stream is over; the receiver forgets it, and ignores frames that
  arrive later for it;
- WINDOW (``MUX_CREDIT``): 4 bytes, credit returned by the receiver once it delivered that many
  bytes. Each direction of each stream starts with ``MUX_WINDOW`` bytes of
  credit, so a stream whose reader is slow stops only itself, and what either
  side buffers stays bounded.

At most ``RELAY_CONNECTIONS_MAX`` connections are served at once (the host's
end allows no more streams); up to ``RELAY_WAITING_MAX`` more wait for a slot,
a descriptor each and no thread, and any beyond those are closed.
"""

import _socket
import _thread
import os
import time

#: Destinations asked for while the network is off: [host, port], oldest first.
ATTEMPTS = []
ATTEMPTS_MAX = 64
RELAY_CONNECTIONS_MAX = 256
#: Connections accepted beyond those, each waiting (a descriptor, no thread) for a slot;
#: more at once are closed.
RELAY_WAITING_MAX = 1024
#: How often waiting connections are retried when no thread could be made for them.
RELAY_RETRY_EVERY = 0.2
_RELAY = {"open": 0, "channel": None}
_RELAY_WAITING = []
_RELAY_LOCK = _thread.allocate_lock()

MUX_OPEN, MUX_DATA, MUX_EOF, MUX_CLOSE, MUX_CREDIT = 1, 2, 3, 4, 5
MUX_HEADER = 9
MUX_PAYLOAD_MAX = 128 * 1024
MUX_WINDOW = 256 * 1024
#: Credit is returned once this much was delivered (fewer, larger WINDOW frames).
MUX_RETURN_AT = 64 * 1024


def parse_egress(text):
    """The host's setting: "" (no relay at all) or ``CHANNEL_FD<TAB>NO_PROXY``, where an
    empty descriptor means the network is off."""
    if not text:
        return None
    fd, _, no_proxy = text.partition("\t")
    return {"socket": int(fd) if fd.isdigit() else None, "no_proxy": no_proxy}


def attempts_text(attempts):
    """``host port`` lines, as the host reads them back (``egress.relay_attempts``)."""
    return "".join("%s %d\n" % (host, port) for host, port in attempts)


def start_relay(config):
    """Start serving; return the proxy environment for every command."""
    channel = None
    if config.get("socket") is not None:
        channel = _MuxChannel(config["socket"])
    # _socket, not socket: importing socket costs the one-shot init ~15 ms (enum, selectors).
    listener = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    if channel is not None:
        _thread.start_new_thread(channel.read_loop, ())
    _thread.start_new_thread(_relay_accept_loop, (listener, channel))
    proxy = "http://127.0.0.1:%d" % port
    env = {}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "npm_config_proxy",
                 "npm_config_https_proxy"):
        env[name] = proxy
        env[name.lower()] = proxy
    no_proxy = config.get("no_proxy", "")
    for name in ("NO_PROXY", "no_proxy", "npm_config_noproxy"):
        env[name] = no_proxy
    return env


def take_attempts():
    """The destinations tried since the last call, and forget them."""
    with _RELAY_LOCK:
        taken = list(ATTEMPTS)
        del ATTEMPTS[:]
    return taken


def _relay_accept_loop(listener, channel):
    _RELAY["channel"] = channel
    # A connection whose thread could not be made waits; the loop retries it when it wakes.
    listener.settimeout(RELAY_RETRY_EVERY)
    while True:
        try:
            client = _socket.socket(fileno=listener._accept()[0])
        except TimeoutError:
            _relay_retry_waiting()
            continue
        except OSError:
            time.sleep(0.05)  # out of descriptors, say: keep serving the others
            continue
        client.settimeout(None)
        with _RELAY_LOCK:
            start = _RELAY["open"] < RELAY_CONNECTIONS_MAX
            if start:
                _RELAY["open"] += 1
            elif len(_RELAY_WAITING) < RELAY_WAITING_MAX:
                _RELAY_WAITING.append(client)  # served when a connection ends
                continue
        if start:
            _relay_start(client)
        else:
            _relay_close(client)


def _relay_start(client):
    """Serve ``client`` in a thread of its own; it holds one of the connections' slots."""
    if not _relay_spawn(client):
        _relay_defer(client)


def _relay_spawn(client):
    channel = _RELAY["channel"]
    try:
        if channel is None:
            _thread.start_new_thread(_relay_refuse, (client,))
        else:
            _thread.start_new_thread(_mux_serve, (channel, client))
    except RuntimeError:
        return False
    return True


def _relay_defer(client):
    """No thread could be made for ``client`` (the sandbox's process limit counts threads,
    and those of connections just ended may not have exited yet): it gives its slot back
    and waits at the front, never dropped (seen here 2026-12-07: a request made right after
    1,000 connections were opened and closed was reset, about one run in seven)."""
    with _RELAY_LOCK:
        _RELAY["open"] -= 1
        _RELAY_WAITING.insert(0, client)


def _relay_retry_waiting():
    """Start what waits while slots are free (after a thread could not be made)."""
    while True:
        with _RELAY_LOCK:
            if not _RELAY_WAITING or _RELAY["open"] >= RELAY_CONNECTIONS_MAX:
                return
            client = _RELAY_WAITING.pop(0)
            _RELAY["open"] += 1
        if _relay_gone(client):
            _relay_finished(client)
            continue
        if not _relay_spawn(client):
            _relay_defer(client)
            return


def _relay_finished(client):
    """``client`` is done: its slot goes to the oldest waiting connection still open."""
    _relay_close(client)
    while True:
        with _RELAY_LOCK:
            waiting = _RELAY_WAITING.pop(0) if _RELAY_WAITING else None
            if waiting is None:
                _RELAY["open"] -= 1
                return
        if _relay_gone(waiting):
            # Closed while it waited: nothing to serve, no thread, no stream (after a
            # flood of 1,000 connections, serving each one left a request behind them
            # waiting 9-13 s; seen here 2026-12-07).
            _relay_close(waiting)
            continue
        if not _relay_spawn(waiting):
            _relay_defer(waiting)
        return


def _relay_gone(client):
    """Whether a waiting connection was closed by its client before anything was sent."""
    try:
        return client.recv(1, _socket.MSG_PEEK | _socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _relay_close(sock):
    try:
        sock.close()
    except OSError:
        pass


def _mux_wake(lock):
    """Wake the one thread that waits on ``lock`` (a binary semaphore: a wake-up given
    before the wait is kept, several collapse into one)."""
    try:
        lock.release()
    except RuntimeError:
        pass  # already awake


class _MuxStream:
    """One accepted connection on the channel. Its state is guarded by the channel's lock;
    each of its two threads sleeps on a lock of its own."""

    def __init__(self, sid, client):
        self.sid = sid
        self.client = client
        self.credit = MUX_WINDOW  # what the host may still be sent
        self.pending = []  # from the host, to deliver: bytes, None (EOF) or False (CLOSE)
        self.pending_size = 0
        self.busy = False  # a thread holds bytes for the client that are not sent yet
        self.delivered = 0  # given to the client since credit last went back
        self.closed = False
        self.threads = 2  # the last one out closes the client
        self.credit_wake = _thread.allocate_lock()
        self.credit_wake.acquire()
        self.pending_wake = _thread.allocate_lock()
        self.pending_wake.acquire()


class _MuxChannel:
    """The donated socket and the streams on it."""

    def __init__(self, fd):
        donated = _socket.socket(fileno=fd)
        # Off the number runsc gave it and close-on-exec (_socket.dup): no command inherits it.
        self.sock = _socket.socket(fileno=_socket.dup(fd))
        donated.close()
        os.set_inheritable(self.sock.fileno(), False)
        self.sock.settimeout(None)  # blocking, whatever the descriptor came with
        self.lock = _thread.allocate_lock()
        self.send_lock = _thread.allocate_lock()
        self.streams = {}
        self.next_sid = 1
        self.alive = True
        self.buffer = bytearray()

    def send(self, sid, kind, payload=b""):
        frame = (sid.to_bytes(4, "big") + bytes((kind,)) + len(payload).to_bytes(4, "big")
                 + payload)
        with self.send_lock:
            try:
                self.sock.sendall(frame)
            except OSError:
                self.alive = False
                return False
        return True

    def open(self, client):
        with self.lock:  # held while sending: the host sees the ids in order
            if not self.alive:
                return None
            stream = _MuxStream(self.next_sid, client)
            self.next_sid += 1
            self.streams[stream.sid] = stream
            sent = self.send(stream.sid, MUX_OPEN)
        if not sent:
            self.drop(stream, False)
            return None
        return stream

    def drop(self, stream, tell_host):
        """The stream is over: forget it, wake its threads, tell the host if it asked."""
        with self.lock:
            if stream.closed:
                return
            stream.closed = True
            self.streams.pop(stream.sid, None)
        if tell_host:
            self.send(stream.sid, MUX_CLOSE)
        _mux_shutdown(stream.client)
        _mux_wake(stream.credit_wake)
        _mux_wake(stream.pending_wake)

    def read_loop(self):
        """The host's frames, dispatched without ever waiting on a client."""
        try:
            while True:
                head = self._read(MUX_HEADER)
                sid = int.from_bytes(head[:4], "big")
                kind = head[4]
                length = int.from_bytes(head[5:], "big")
                if length > MUX_PAYLOAD_MAX:
                    break
                payload = self._read(length) if length else b""
                if not self._dispatch(sid, kind, payload):
                    break
        except OSError:
            pass
        with self.lock:
            self.alive = False
            streams = list(self.streams.values())
        for stream in streams:
            self.drop(stream, False)
        try:
            self.sock.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass

    def _read(self, size):
        # Large reads, several frames at a time: under gVisor every system call counts.
        buffer = self.buffer
        while len(buffer) < size:
            data = self.sock.recv(MUX_WINDOW)
            if not data:
                raise OSError("the host closed the channel")
            buffer += data
        taken = bytes(buffer[:size])
        del buffer[:size]
        return taken

    def _dispatch(self, sid, kind, payload):
        with self.lock:
            stream = self.streams.get(sid)
            if stream is None:
                return True  # a stream already over
            direct = kind == MUX_DATA and not stream.pending and not stream.busy
            if direct:
                stream.busy = True
        if direct:
            # Nothing queued before it: straight to the client if it takes it now, which
            # spares a hand-over to the stream's own thread (costly under gVisor).
            try:
                sent = stream.client.send(payload, _socket.MSG_DONTWAIT)
            except OSError:
                sent = 0  # full (or gone: its own thread finds out)
            payload = payload[sent:]
            with self.lock:
                stream.busy = False
                stream.delivered += sent
                credit = stream.delivered if stream.delivered >= MUX_RETURN_AT else 0
                if credit:
                    stream.delivered = 0
            if credit:
                self.send(sid, MUX_CREDIT, credit.to_bytes(4, "big"))
            if not payload:
                return True
        with self.lock:
            if stream.closed:
                return True
            if kind in (MUX_DATA, MUX_EOF):
                stream.pending.append(payload if kind == MUX_DATA else None)
                stream.pending_size += len(payload)
                if stream.pending_size > MUX_WINDOW:
                    return False  # more than the credit given
                wake = stream.pending_wake
            elif kind == MUX_CREDIT and len(payload) == 4:
                stream.credit += int.from_bytes(payload, "big")
                wake = stream.credit_wake
            elif kind == MUX_CLOSE:
                stream.pending.append(False)  # deliver what came, then end
                wake = stream.pending_wake
            else:
                return False
        _mux_wake(wake)
        return True

    def finished(self, stream):
        with self.lock:
            stream.threads -= 1
            last = stream.threads == 0
        if last:
            _relay_finished(stream.client)


def _mux_shutdown(sock):
    try:
        sock.shutdown(_socket.SHUT_RDWR)
    except OSError:
        pass


def _mux_serve(channel, client):
    """From the client to the host, in this thread; the other way in one more."""
    stream = channel.open(client)
    if stream is None:
        _relay_finished(client)
        return
    try:
        _thread.start_new_thread(_mux_deliver, (channel, stream))
    except RuntimeError:
        channel.drop(stream, True)
        channel.finished(stream)
        channel.finished(stream)
        return
    sent = False
    try:
        while True:
            with channel.lock:
                credit, closed = stream.credit, stream.closed
            if closed:
                break
            if credit <= 0:
                stream.credit_wake.acquire()
                continue
            data = client.recv(min(credit, MUX_PAYLOAD_MAX))
            if not data:
                if not sent:
                    # Gone without a word: no answer can come, so no need to wait for one
                    # (a flood of empty connections frees its slots at once).
                    channel.drop(stream, True)
                    break
                with channel.lock:
                    closed = stream.closed
                if not closed:
                    channel.send(stream.sid, MUX_EOF)
                break
            sent = True
            with channel.lock:
                stream.credit -= len(data)
            channel.send(stream.sid, MUX_DATA, data)
    except OSError:
        channel.drop(stream, True)  # the client reset: the host's side ends too
    channel.finished(stream)


def _mux_deliver(channel, stream):
    """From the host to the client, what the channel's reader could not give it at once;
    credit goes back as the client takes the bytes."""
    try:
        while True:
            with channel.lock:
                item = stream.pending.pop(0) if stream.pending else ()
                if isinstance(item, bytes):
                    stream.pending_size -= len(item)
                    stream.busy = True
                closed = stream.closed
            if item == ():
                if closed:
                    break
                stream.pending_wake.acquire()
                continue
            if item is False:  # the host ended the stream
                channel.drop(stream, False)
                break
            if item is None:  # the host sends no more: so does the client's peer
                stream.client.shutdown(_socket.SHUT_WR)
                continue
            try:
                stream.client.sendall(item)
            finally:
                with channel.lock:
                    stream.busy = False
                    stream.delivered += len(item)
                    credit = stream.delivered if stream.delivered >= MUX_RETURN_AT else 0
                    if credit:
                        stream.delivered = 0
            if credit:
                channel.send(stream.sid, MUX_CREDIT, credit.to_bytes(4, "big"))
    except OSError:
        channel.drop(stream, True)
    channel.finished(stream)


def _relay_refuse(client):
    """The network is off: read the request line, note where it wanted to go, say no."""
    try:
        _relay_answer_off(client)
    finally:
        _relay_finished(client)


def _relay_answer_off(client):
    client.settimeout(10)
    head = b""
    try:
        while b"\r\n" not in head and len(head) < 8192:
            data = client.recv(4096)
            if not data:
                break
            head += data
    except OSError:
        pass
    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    target = ""
    if len(parts) == 3:
        target = parts[1]
        if parts[0].upper() != "CONNECT":
            rest = target.split("://", 1)[-1]
            target = rest.split("/", 1)[0]
            if ":" not in target.rsplit("]", 1)[-1]:
                target += ":443" if parts[1].lower().startswith("https:") else ":80"
    host, _, port = target.rpartition(":")
    if host and port.isdigit():
        with _RELAY_LOCK:
            if len(ATTEMPTS) < ATTEMPTS_MAX:
                ATTEMPTS.append([host.strip("[]")[:253], int(port)])
    body = b"gvisor-magic: the network is off in this sandbox\n"
    try:
        client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n"
                       b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    except OSError:
        pass
