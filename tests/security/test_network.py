"""Network with ``network=False``: the host's loopback, DNS, raw sockets, unix sockets."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid

import pytest

PROBE_NETWORK = r'''
import json, socket, sys
tcp_port, udp_port, resolver, work_socket, outside_socket, abstract = sys.argv[1:7]
found = {}

def attempt(name, action):
    try:
        found[name] = "ok %s" % (action(),)
    except OSError as exc:
        found[name] = "ERR %s %s" % (type(exc).__name__, exc.errno)

def tcp():
    with socket.create_connection(("127.0.0.1", int(tcp_port)), timeout=2) as s:
        return s.recv(100).decode()

def udp():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(b"ping", ("127.0.0.1", int(udp_port)))
        return s.recv(100).decode()

def dns():
    # A root NS query sent straight to the host's resolver, then the libc way.
    query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(query, (resolver, 53))
        return "answer of %d bytes" % len(s.recv(512))

def unix(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(path)
        return s.recv(100).decode()

def raw(family, kind, proto):
    socket.socket(family, kind, proto).close()
    return "created"

attempt("tcp", tcp)
attempt("udp", udp)
attempt("dns", dns)
attempt("getaddrinfo", lambda: socket.getaddrinfo("localhost.", 80)[0][4])
attempt("raw", lambda: raw(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
attempt("packet", lambda: raw(socket.AF_PACKET, socket.SOCK_RAW, 0))
attempt("unix-work", lambda: unix(work_socket))
attempt("unix-outside", lambda: unix(outside_socket))
attempt("unix-abstract", lambda: unix("\0" + abstract))
print(json.dumps(found))
'''


class HostServers:
    """TCP, UDP and unix-socket servers on the host that answer with a canary."""

    CANARY = "hello-from-host"

    def __init__(self, unix_paths: list[str], abstract: str) -> None:
        self.stop = threading.Event()
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.bind(("127.0.0.1", 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.unix = []
        for path in [*unix_paths, "\0" + abstract]:
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(path)
            self.unix.append(server)
        self.threads = []
        for server in [self.tcp, *self.unix]:
            server.listen(8)
            server.settimeout(0.2)
            self.threads.append(threading.Thread(target=self._accept, args=(server,)))
        self.udp.settimeout(0.2)
        self.threads.append(threading.Thread(target=self._echo))
        for thread in self.threads:
            thread.start()

    def _accept(self, server: socket.socket) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(self.CANARY.encode())

    def _echo(self) -> None:
        while not self.stop.is_set():
            try:
                _data, peer = self.udp.recvfrom(100)
            except OSError:
                continue
            self.udp.sendto(self.CANARY.encode(), peer)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()
        for server in [self.tcp, self.udp, *self.unix]:
            server.close()


def _resolver() -> str:
    with contextlib.suppress(OSError), open("/etc/resolv.conf") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver" and ":" not in parts[1]:
                return parts[1]
    return "127.0.0.53"


@pytest.fixture
def host_servers(probe, outside):
    abstract = f"gvm-probe-{uuid.uuid4().hex[:10]}"
    paths = [str(probe.workdir / "host.sock"), str(outside / "host.sock")]
    servers = HostServers(paths, abstract)
    try:
        yield servers, paths, abstract
    finally:
        servers.close()
        for path in paths:
            with contextlib.suppress(OSError):
                os.unlink(path)


def test_network_is_off(probe, host_servers):
    servers, (work_socket, outside_socket), abstract = host_servers
    _result, found = probe.run_python(
        PROBE_NETWORK, str(servers.tcp.getsockname()[1]), str(servers.udp.getsockname()[1]),
        _resolver(), work_socket, outside_socket, abstract, timeout=90)
    canary = HostServers.CANARY
    probe.verdict("TCP to a server on the host's 127.0.0.1", canary in found["tcp"],
                  found["tcp"])
    probe.verdict("UDP to a server on the host's 127.0.0.1", canary in found["udp"],
                  found["udp"])
    probe.verdict("DNS (a query to the host's resolver)", found["dns"].startswith("ok"),
                  found["dns"])
    probe.verdict("raw and packet sockets", found["raw"].startswith("ok")
                  or found["packet"].startswith("ok"), f"{found['raw']} / {found['packet']}")
    probe.verdict("host unix socket in the working dir", canary in found["unix-work"],
                  found["unix-work"])
    probe.verdict("host unix socket elsewhere / abstract", canary in found["unix-outside"]
                  or canary in found["unix-abstract"],
                  f"{found['unix-outside']} / {found['unix-abstract']}")
    assert probe.results[-1].network is (not probe.isolated)
