"""The sandbox's end of its network: an HTTP proxy address on 127.0.0.1 for its tools.

Its source is put in front of the init's or the agent's (both passed to the
sandbox's Python with ``-I -S -c``), so it uses only built-in modules and
defines names only.

``start_relay(config)`` listens on an ephemeral port of the sandbox's own
loopback, serves it from a thread of the process that calls it (PID 1), and
returns the environment that points the usual tools at it. With
``config["socket"]`` (a Unix socket the host's proxy listens on, shared with
``runsc --host-uds=open``) every connection is passed through to that proxy,
which alone decides where it may go. Without it the network is off: each
connection gets a 403 that says so, and the destination it asked for is kept
in ``ATTEMPTS`` (what the sandbox reports there is only ever shown, never
trusted).
"""

import _socket
import _thread
import time

#: Destinations asked for while the network is off: [host, port], oldest first.
ATTEMPTS = []
ATTEMPTS_MAX = 64
RELAY_CONNECTIONS_MAX = 256
_RELAY = {"open": 0}
_RELAY_LOCK = _thread.allocate_lock()


def parse_egress(text):
    """The host's setting: "" (no relay at all) or ``SOCKET_PATH<TAB>NO_PROXY``, where an
    empty socket path means the network is off."""
    if not text:
        return None
    path, _, no_proxy = text.partition("\t")
    return {"socket": path or None, "no_proxy": no_proxy}


def attempts_text(attempts):
    """``host port`` lines, as the host reads them back (``egress.relay_attempts``)."""
    return "".join("%s %d\n" % (host, port) for host, port in attempts)


def start_relay(config):
    """Start serving; return the proxy environment for every command."""
    # _socket, not socket: importing socket costs the one-shot init ~15 ms (enum, selectors).
    listener = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    _thread.start_new_thread(_accept_loop, (listener, config.get("socket")))
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


def _accept_loop(listener, socket_path):
    while True:
        try:
            client = _socket.socket(fileno=listener._accept()[0])
        except OSError:
            time.sleep(0.05)  # out of descriptors, say: keep serving the others
            continue
        with _RELAY_LOCK:
            busy = _RELAY["open"] >= RELAY_CONNECTIONS_MAX
            if not busy:
                _RELAY["open"] += 1
        if busy:
            _close(client)
            continue
        try:
            _thread.start_new_thread(_serve, (client, socket_path))
        except RuntimeError:
            _finished(client)


def _finished(*sockets):
    for sock in sockets:
        _close(sock)
    with _RELAY_LOCK:
        _RELAY["open"] -= 1


def _close(sock):
    try:
        sock.close()
    except OSError:
        pass


def _serve(client, socket_path):
    if socket_path is None:
        try:
            _refuse(client)
        finally:
            _finished(client)
        return
    upstream = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        upstream.connect(socket_path)
        _thread.start_new_thread(_pump, (upstream, client, True))
    except (OSError, RuntimeError):
        _finished(client, upstream)
        return
    _pump(client, upstream, False)


def _pump(source, sink, last):
    """Copy until ``source`` ends. The proxy's side (``last``) ends the connection: it
    shuts both sockets down, which wakes the other pump, and closes them."""
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    if not last:
        try:
            sink.shutdown(_socket.SHUT_WR)  # the client is done sending
        except OSError:
            pass
        return
    for sock in (sink, source):
        try:
            sock.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass
    _finished(source, sink)


def _refuse(client):
    """The network is off: read the request line, note where it wanted to go, say no."""
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
