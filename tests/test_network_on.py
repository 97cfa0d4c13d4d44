"""``network="host"`` is the host's network on every backend that accepts it, and a clear
refusal where a backend cannot give it: a server on the host's 127.0.0.1 answers, and the
sandbox sees the host's interfaces, not only ``lo``. (Never aimed anywhere but this machine.)
Allowlists and ``network=True`` go through the host's proxy: ``test_network_allowlist.py``."""

from __future__ import annotations

import http.server
import sys
import threading

import pytest

from gvisor_magic import IsolatedSession, IsolationUnavailable, run_command_isolated

PROBE = ("import socket, sys, urllib.request\n"
         "print('interfaces', sorted(name for _, name in socket.if_nameindex()))\n"
         "print('answer', urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())\n")


@pytest.fixture
def host_server():
    """A tiny HTTP server on the host's loopback, answering one word."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"host-server-says-hi"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("flavour", ["one-shot", "session"])
def test_network_on_reaches_the_host_and_off_does_not(flavour, host_server, runsc_works):
    argv = [sys.executable, "-I", "-c", PROBE, host_server]
    if flavour == "session":
        with IsolatedSession(mode="runsc", network="host") as session:
            on = session.run(argv, timeout=60)
        with IsolatedSession(mode="runsc") as session:
            off = session.run(argv, timeout=60)
    else:
        on = run_command_isolated(argv, mode="runsc", network="host", timeout=60)
        off = run_command_isolated(argv, mode="runsc", timeout=60)
    assert on.success and on.isolated and on.network, on.describe() + on.stderr[-500:]
    assert "answer host-server-says-hi" in on.stdout
    assert "interfaces ['lo']" not in on.stdout, on.stdout
    assert not off.success and not off.network, off.describe()
    assert "interfaces ['lo']" in off.stdout and "host-server-says-hi" not in off.stdout


def test_docker_refuses_network_on_and_says_why(docker_works, host_server):
    """Docker's runsc runtime is registered with --network=none: network="host" there is an
    error naming the reason, never a run that pretends to have the network."""
    with pytest.raises(IsolationUnavailable) as raised:
        run_command_isolated(["true"], mode="docker", network="host", timeout=60)
    assert "--network=none" in str(raised.value)
