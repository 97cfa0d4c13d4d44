"""A network allowlist, as a user meets it: ``pip install``, ``npm install`` and ``git clone``
reach the servers the allowlist names and nothing else, through the host's proxy, while the
sandbox itself keeps no network; what was refused is in the result, with how to allow it.

Every server here is this machine's own (127.0.0.1); nothing is sent anywhere else. With
the network off, a tool's request for pypi.org is answered inside the sandbox.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from support.egress_servers import git_http, npm_registry, plain_server, pypi_index

from gvisor_magic import IsolatedSession, IsolationUnavailable, run_command_isolated

FLAVOURS = ["one-shot", "session"]


def run(flavour: str, command, network, workdir: Path, timeout: float = 180, **kwargs):
    if flavour == "session":
        with IsolatedSession(workdir, mode="runsc", network=network) as session:
            return session.run(command, timeout=timeout, **kwargs)
    return run_command_isolated(command, working_dir=workdir, mode="runsc", network=network,
                                timeout=timeout, **kwargs)


def quiet_pip() -> dict[str, str]:
    # No site pip.conf (its extra indexes) and no self-check: only the local index is asked.
    return {"PIP_CONFIG_FILE": "/dev/null", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_NO_CACHE_DIR": "1"}


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_pip_installs_from_an_allowed_index_and_nothing_else_is_reached(
        flavour, tmp_path, caplog, runsc_works):
    caplog.set_level(logging.INFO, "gvisor_magic.egress")
    with pypi_index(tmp_path / "index") as index, plain_server() as other:
        script = (f"{sys.executable} -m pip install --no-deps --index-url {index.url}/simple "
                  f"--target {tmp_path}/site gm-egress-probe && "
                  f"{sys.executable} -c \"import urllib.request as u; "
                  f"u.urlopen('{other.url}/secret', timeout=10)\"")
        result = run(flavour, script, [index.authority], tmp_path, env=quiet_pip())
    assert result.isolated and result.network, result.describe()
    assert "Successfully installed gm-egress-probe-1.0" in result.stdout, result.stderr[-2000:]
    installed = tmp_path / "site" / "gm_egress_probe.py"
    assert "installed through the allowlist" in installed.read_text()
    assert any(hit.endswith(".whl") for hit in index.hits), index.hits
    # The second server never saw a byte; the command was told why, and so is the user.
    assert other.hits == []
    assert result.returncode != 0 and "403" in result.stderr
    assert [(b.host, b.port) for b in result.blocked] == [("127.0.0.1", other.port)]
    assert f"port {other.port} is not allowed for 127.0.0.1" in result.blocked[0].reason
    assert f"--allow-host 127.0.0.1:{other.port} allows it" in result.blocked[0].hint
    assert any(f"127.0.0.1:{other.port}" in w for w in result.warnings())
    assert result.network_policy == f"allowlist: 127.0.0.1:{index.port}"
    # Every decision is in the log, with the word "gvisor".
    assert f"gvisor: egress allowed CONNECT 127.0.0.1:{index.port}" in caplog.text or \
        f"gvisor: egress allowed GET 127.0.0.1:{index.port}" in caplog.text
    assert f"gvisor: egress blocked GET 127.0.0.1:{other.port}" in caplog.text


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_npm_installs_from_an_allowed_registry(flavour, tmp_path, runsc_works):
    with npm_registry(tmp_path / "registry") as registry:
        script = (f"npm install --prefix {tmp_path}/app --registry {registry.url}/ --no-audit "
                  "--no-fund --no-update-notifier --cache /tmp/npm-cache gm-egress-probe && "
                  f"cd {tmp_path}/app && node -e \"console.log(require('gm-egress-probe'))\"")
        result = run(flavour, script, f"127.0.0.1:{registry.port}", tmp_path)
    assert result.success, result.describe() + result.stdout[-1500:] + result.stderr[-2500:]
    assert "installed through the allowlist" in result.stdout
    assert any(hit.endswith(".tgz") for hit in registry.hits), registry.hits
    assert result.blocked == ()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_git_clones_over_http_from_an_allowed_server(flavour, tmp_path, runsc_works):
    with git_http(tmp_path / "git") as server:
        result = run(flavour, f"git clone -q {server.url}/probe.git {tmp_path}/clone",
                     [server.authority], tmp_path)
    assert result.success, result.describe() + result.stderr[-2000:]
    assert (tmp_path / "clone" / "README").read_text().strip() == "cloned through the allowlist"
    assert any("git-upload-pack" in hit for hit in server.hits), server.hits


BYPASS = r"""
import json, os, socket, sys, threading
allowed, other, host_ip, resolver, outside_port = sys.argv[1:6]
proxy = ("127.0.0.1", int(os.environ["HTTP_PROXY"].rsplit(":", 1)[1]))
found = {}

def exchange(data, timeout=10):
    s = socket.create_connection(proxy, timeout=timeout)
    try:
        s.sendall(data)
        reply = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    except OSError as exc:
        reply = reply or ("error " + type(exc).__name__).encode()
    finally:
        s.close()
    return reply.decode("latin-1")

def status(reply):
    return reply.split(" ", 2)[1] if reply.startswith("HTTP/") else reply[:40]

def attempt(name, fn):
    try:
        found[name] = fn()
    except OSError as exc:
        found[name] = "blocked " + type(exc).__name__

attempt("direct_tcp_loopback", lambda: socket.create_connection(
    ("127.0.0.1", int(other.split(":")[1])), timeout=3) and "connected")
attempt("direct_tcp_host", lambda: socket.create_connection(
    (host_ip, int(outside_port)), timeout=3) and "connected")
def dns():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(3)
    u.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x07invalid\x00"
             b"\x00\x01\x00\x01", (resolver, 53))
    return "answered " + repr(u.recv(512)[:4])
attempt("dns_query", dns)
attempt("getaddrinfo", lambda: "resolved " + socket.getaddrinfo("localhost.invalid", 80)[0][4][0])
port = allowed.split(":")[1]
for name, target in [("metadata", "169.254.169.254:80"), ("ipv6", "[::1]:" + port),
                     ("decimal", "2130706433:" + port), ("octal", "0177.0.0.1:" + port),
                     ("hex", "0x7f.0.0.1:" + port), ("unlisted", other)]:
    found["connect_" + name] = status(exchange(
        f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()))
two = exchange((f"GET http://{allowed}/one HTTP/1.1\r\nHost: {allowed}\r\n\r\n"
                f"GET /two HTTP/1.1\r\nHost: {other}\r\n\r\n"
                f"GET http://{other}/three HTTP/1.1\r\nHost: {other}\r\n\r\n").encode())
found["kept_alive"] = [status(two), two.count("HTTP/1.")]
found["absolute_uri_other"] = status(exchange(
    f"GET http://{other}/x HTTP/1.1\r\nHost: {allowed}\r\n\r\n".encode()))
found["oversized"] = status(exchange(
    f"GET http://{allowed}/big HTTP/1.1\r\nX-Big: {'a' * 70000}\r\n\r\n".encode()))
held, refused = [], 0
for _ in range(1000):
    try:
        held.append(socket.create_connection(proxy, timeout=5))
    except OSError:
        refused += 1
found["parallel_opened"] = len(held)
for s in held:
    s.close()
found["after_flood"] = status(exchange(
    f"GET http://{allowed}/after HTTP/1.1\r\nHost: {allowed}\r\n\r\n".encode()))
print(json.dumps(found))
"""


def host_address() -> str:
    """This machine's own non-loopback IPv4 address (asked of the routing table, no packet)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: connect() on UDP sends nothing
        return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        probe.close()


def resolver_address() -> str:
    for line in Path("/etc/resolv.conf").read_text().splitlines():
        if line.startswith("nameserver"):
            return line.split()[1]
    return "127.0.0.53"


@pytest.fixture
def outside_listener():
    """A TCP server on every host address, counting who connects."""
    server = socket.create_server(("0.0.0.0", 0))
    server.settimeout(0.2)
    accepted: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, peer = server.accept()
            except OSError:
                continue
            accepted.append(peer[0])
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_bypass_attempts_from_inside_all_fail_and_the_proxy_stays_up(
        flavour, tmp_path, outside_listener, runsc_works):
    outside_port, accepted = outside_listener
    with plain_server() as allowed, plain_server() as other:
        argv = [sys.executable, "-I", "-c", BYPASS, allowed.authority, other.authority,
                host_address(), resolver_address(), str(outside_port)]
        started = time.monotonic()
        result = run(flavour, argv, [allowed.authority], tmp_path)
        assert result.success, result.describe() + result.stderr[-3000:]
        found = json.loads(result.stdout)
        # The host answers at once after the flood: its own server, through no proxy.
        before = time.monotonic()
        with socket.create_connection(("127.0.0.1", allowed.port), timeout=5) as probe:
            probe.sendall(b"GET /host HTTP/1.0\r\n\r\n")
            assert probe.recv(100).startswith(b"HTTP/1.")
        assert time.monotonic() - before < 2, "the host was slow to answer after the flood"
    for name in ("direct_tcp_loopback", "direct_tcp_host", "dns_query", "getaddrinfo"):
        assert found[name].startswith("blocked"), (name, found)
    assert accepted == []
    for name in ("metadata", "ipv6", "decimal", "octal", "hex", "unlisted"):
        assert found[f"connect_{name}"] == "403", (name, found)
    assert found["kept_alive"] == ["200", 1], found
    assert found["absolute_uri_other"] == "403", found
    assert found["oversized"] in ("431", "error ConnectionResetError", ""), found
    assert found["parallel_opened"] >= 200, found
    assert found["after_flood"] == "200", found
    # Only the allowed server was reached, and only by the requests the allowlist allowed.
    assert other.hits == []
    assert sorted(allowed.hits) == sorted(["GET /one", "GET /after", "GET /host"]), allowed.hits
    refused = {(b.host, b.port): b.reason for b in result.blocked}
    assert refused[("169.254.169.254", 80)] == "not on the allowlist"
    assert ("127.0.0.1", other.port) in refused
    assert time.monotonic() - started < 120


def test_the_kernels_own_ports_are_refused(tmp_path, runsc_works):
    """A real kernel's ZMQ ports on the host's loopback: not reachable through the proxy,
    even with network=True (public addresses only)."""
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3")
    try:
        info = manager.get_connection_info()
        ports = [info[name] for name in ("shell_port", "iopub_port", "control_port", "hb_port")]
        probe = ("import os, socket, sys\n"
                 "proxy = ('127.0.0.1', int(os.environ['HTTP_PROXY'].rsplit(':', 1)[1]))\n"
                 "for target in sys.argv[1:]:\n"
                 "    s = socket.create_connection(proxy, timeout=10)\n"
                 "    s.sendall(f'CONNECT {target} HTTP/1.1\\r\\n\\r\\n'.encode())\n"
                 "    print(s.recv(200).decode().split()[1])\n")
        targets = [f"127.0.0.1:{port}" for port in ports] + ["169.254.169.254:80"]
        result = run_command_isolated([sys.executable, "-I", "-c", probe, *targets],
                                      working_dir=tmp_path, mode="runsc", network=True,
                                      timeout=120)
        assert client.is_alive()
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    assert result.success, result.stderr[-2000:]
    assert result.stdout.split() == ["403"] * 5
    reasons = [b.reason for b in result.blocked]
    assert all("loopback" in reason for reason in reasons[:4]), reasons
    assert "169.254.169.254, a link-local address" in reasons[4], reasons
    assert result.network_policy == "public internet through the host's filtering proxy"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_with_the_network_off_the_result_says_what_was_tried(flavour, tmp_path, runsc_works):
    """pip is told at once that there is no network (no DNS retries), and the user is told
    which destination and how to allow it. Nothing leaves the sandbox."""
    script = (f"{sys.executable} -m pip download --retries 0 --timeout 5 -d /tmp/d six; "
              f"{sys.executable} -c \"import urllib.request as u; "
              "u.urlopen('https://registry.npmjs.org/left-pad', timeout=5)\"")
    started = time.monotonic()
    result = run(flavour, script, False, tmp_path, env=quiet_pip())
    assert time.monotonic() - started < 60
    assert not result.network and result.network_policy == "off"
    tried = {(b.host, b.port): b for b in result.blocked}
    assert tried[("pypi.org", 443)].reason == "the network is off"
    assert tried[("pypi.org", 443)].hint == "--network pypi allows it"
    assert tried[("registry.npmjs.org", 443)].hint == "--network npm allows it"
    assert any("pypi.org:443: the network is off; --network pypi allows it" in w
               for w in result.warnings())


def test_network_true_refuses_the_hosts_own_addresses_and_host_reaches_them(
        tmp_path, runsc_works):
    """network=True is public addresses only: this machine's own (private) address is
    refused at the proxy; network="host" is the host's network, loopback included."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    hits: list[str] = []
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    fetch = [sys.executable, "-I", "-c", "import sys, urllib.request as u; "
             "print(u.urlopen(sys.argv[1], timeout=10).read().decode())"]
    try:
        public = run_command_isolated([*fetch, f"http://{host_address()}:{port}/public"],
                                      working_dir=tmp_path, mode="runsc", network=True,
                                      timeout=120)
        assert hits == []
        host = run_command_isolated([*fetch, f"http://127.0.0.1:{port}/host"],
                                    working_dir=tmp_path, mode="runsc", network="host",
                                    timeout=120)
    finally:
        server.shutdown()
        server.server_close()
    assert public.returncode != 0, public.stdout
    assert [(b.host, b.port) for b in public.blocked] == [(host_address(), port)]
    assert "not public" in public.blocked[0].reason or "private" in public.blocked[0].reason
    assert host.success and host.stdout.strip() == "ok", host.stderr[-1000:]
    assert hits == ["/host"]
    assert host.network_policy.startswith("HOST NETWORK") and "HOST NETWORK" in host.describe()


def test_the_subprocess_backend_refuses_an_allowlist(tmp_path):
    """On the host an allowlist cannot be enforced: the command never runs there."""
    marker = tmp_path / "ran"
    for network in ("pypi", True, ["example.invalid"]):
        with pytest.raises(IsolationUnavailable, match="never isolates"):
            run_command_isolated(["touch", str(marker)], mode="subprocess", network=network)
        with pytest.raises(IsolationUnavailable, match="never isolates"):
            IsolatedSession(tmp_path, mode="subprocess", network=network)
    assert not marker.exists()


def test_docker_refuses_an_allowlist_and_names_the_fix(tmp_path, docker_works):
    marker = tmp_path / "ran"
    for network in ("pypi", True, "host"):
        with pytest.raises(IsolationUnavailable) as raised:
            run_command_isolated(["touch", str(marker)], working_dir=tmp_path, mode="docker",
                                 network=network, timeout=60)
        assert "runsc backend" in str(raised.value), str(raised.value)
    assert not marker.exists()


def test_docker_with_the_network_off_says_what_was_tried(tmp_path, docker_works):
    result = run_command_isolated(
        [sys.executable, "-I", "-c", "import urllib.request as u; "
         "u.urlopen('https://pypi.org/simple/six/', timeout=5)"],
        working_dir=tmp_path, mode="docker", timeout=120)
    assert result.isolated and result.returncode != 0
    assert [(b.host, b.port, b.hint) for b in result.blocked] == [
        ("pypi.org", 443, "--network pypi allows it")]


PARALLEL = r"""
import hashlib, json, sys, threading, time, urllib.request
base, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
found = {"sums": {}, "errors": []}

def fetch(name):
    try:
        with urllib.request.urlopen(f"{base}/{name}", timeout=120) as response:
            digest, got = hashlib.sha256(), 0
            while chunk := response.read(65536):
                digest.update(chunk)
                got += len(chunk)
        found["sums"][name] = [digest.hexdigest(), got]
    except OSError as exc:
        found["errors"].append(f"{name}: {exc}")

threads = [threading.Thread(target=fetch, args=(f"blob{i}",)) for i in range(count)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
# One connection nobody reads for now: another still gets all of its bytes.
stalled = urllib.request.urlopen(f"{base}/big", timeout=120)
started = time.monotonic()
fetch("blob0")
found["beside_a_stalled_one"] = time.monotonic() - started
digest = hashlib.sha256()
while chunk := stalled.read(65536):
    digest.update(chunk)
found["big"] = digest.hexdigest()
print(json.dumps(found))
"""


@pytest.fixture
def blob_server():
    """A loopback server of random blobs (``/blobN``, ``/big``), with their checksums."""
    import hashlib

    blobs = {f"blob{i}": os.urandom(3 << 20) for i in range(20)}
    blobs["big"] = os.urandom(32 << 20)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = blobs.get(self.path.strip("/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], {k: hashlib.sha256(v).hexdigest()
                                         for k, v in blobs.items()}
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_many_parallel_downloads_through_the_channel_and_a_stalled_one_stalls_only_itself(
        flavour, tmp_path, blob_server, runsc_works):
    """Every connection of the sandbox shares one socket to the host (the channel): twenty
    downloads at once all arrive whole, and a connection nobody reads holds up no other."""
    port, sums = blob_server
    result = run(flavour, [sys.executable, "-I", "-c", PARALLEL, f"http://127.0.0.1:{port}",
                           "20", str(3 << 20)], [f"127.0.0.1:{port}"], tmp_path)
    assert result.success, result.describe() + result.stderr[-2000:]
    found = json.loads(result.stdout)
    assert found["errors"] == []
    assert {name: tuple(got) for name, got in found["sums"].items()} == {
        f"blob{i}": (sums[f"blob{i}"], 3 << 20) for i in range(20)}
    assert found["big"] == sums["big"]
    # 3 MiB beside a stalled 32 MiB download: seconds at worst on a loaded machine; a
    # channel stalled with it would never get there (the command's timeout, 180 s).
    assert found["beside_a_stalled_one"] < 60, found


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_channel_arrives_through_the_memory_guards_wrapper(flavour, tmp_path, runsc_works):
    """With a memory limit, runsc starts below a shell that joins the cgroup and execs it:
    the channel's descriptor survives that exec, and the allowlist works as without it."""
    from gvisor_magic import Limits

    fetch = [sys.executable, "-I", "-c", "import sys, urllib.request as u; "
             "print(u.urlopen(sys.argv[1], timeout=30).read().decode())"]
    with plain_server(b"through the wrapper\n") as server:
        limits = Limits(memory=512 << 20)
        if flavour == "session":
            with IsolatedSession(tmp_path, mode="runsc", network=[server.authority],
                                 limits=limits) as session:
                result = session.run([*fetch, f"{server.url}/w"], timeout=120)
        else:
            result = run_command_isolated([*fetch, f"{server.url}/w"], working_dir=tmp_path,
                                          mode="runsc", network=[server.authority],
                                          limits=limits, timeout=120, reuse=False)
    assert result.success and result.stdout.strip() == "through the wrapper", result.describe()
    assert server.hits == ["GET /w"]
