"""Host Unix sockets: none is reachable from inside a runsc sandbox, whatever its network.

A listening socket on the host (an ssh or gpg agent, a container engine's API, a database)
is bound in every place a sandbox may see: the working dir, a repo dir, the Python prefixes
the layout binds, the host's home, a ``python_path`` entry and a gVisor kernel's own dir;
plus one in the abstract namespace. Each is a server on the host that records whether
anything connected. A command then tries them all, with the network off, an allowlist,
``True`` and ``"host"``, one-shot, reused (a pool's warm sandbox) and in a session. The
evidence is the host's: no server saw a connection, and every attempt failed inside.

With a proxied network the sandbox still reaches its own proxy, over the one socket its
PID 1 was given: the same command fetches from an allowed server through it, and holds no
socket descriptor itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.egress_servers import plain_server

from gvisor_magic import IsolatedSession, run_command_isolated
from gvisor_magic.backends.layout import caller_identity, python_prefixes
from gvisor_magic.request import SandboxSpec
from gvisor_magic.warm import POOL

PYTHON = sys.executable
TIMEOUT = 60.0

PROBE = r'''
import json, os, socket, sys, urllib.request
paths, abstract, url = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
found = {}

def unix(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
        return "ok " + s.recv(100).decode()
    except OSError as exc:
        return "ERR %s" % (exc.errno,)
    finally:
        s.close()

for path in paths:
    found[path] = unix(path)
found["abstract"] = unix("\0" + abstract)
held = []
for name in os.listdir("/proc/self/fd"):
    try:
        held.append(os.readlink("/proc/self/fd/" + name))
    except OSError:
        pass
found["sockets_held"] = [h for h in held if h.startswith("socket:")]
if url:
    try:
        found["proxied"] = urllib.request.urlopen(url, timeout=30).status
    except urllib.error.HTTPError as exc:
        found["proxied"] = exc.code
    except OSError as exc:
        found["proxied"] = "ERR %s" % (exc,)
print(json.dumps(found))
'''


class HostSockets:
    """Listening Unix sockets on the host; each records who connected to it."""

    CANARY = "host-socket-answered"

    def __init__(self, paths: list[str], abstract: str) -> None:
        self.paths = paths
        self.abstract = abstract
        self.connected: list[str] = []
        self._servers: list[tuple[str, socket.socket]] = []
        self._stop = threading.Event()
        for name in [*paths, "\0" + abstract]:
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(name)
            server.listen(8)
            server.settimeout(0.1)
            self._servers.append((name, server))
        self._threads = [threading.Thread(target=self._accept, args=item, daemon=True)
                         for item in self._servers]
        for thread in self._threads:
            thread.start()

    def _accept(self, name: str, server: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            self.connected.append(name)
            with conn, contextlib.suppress(OSError):
                conn.sendall(self.CANARY.encode())

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(TIMEOUT)
        for name, server in self._servers:
            server.close()
            if not name.startswith("\0"):
                with contextlib.suppress(OSError):
                    os.unlink(name)


@pytest.fixture
def places() -> Iterator[dict[str, Path]]:
    """Short host directories (a socket's path holds 107 bytes): a working dir, a repo,
    a kernel's dir, a ``python_path`` entry, and a place outside every mount."""
    base = Path(tempfile.mkdtemp(prefix="gvh-", dir="/tmp"))
    found = {name: base / name for name in ("work", "repo", "kernel", "pypath", "outside")}
    for directory in found.values():
        directory.mkdir()
    try:
        yield found
    finally:
        shutil.rmtree(base, ignore_errors=True)


def socket_paths(places: dict[str, Path]) -> list[str]:
    """Where a host socket is placed: every directory a sandbox may bind, and the home."""
    tag = uuid.uuid4().hex[:8]
    paths = [str(places["work"] / "agent.sock"), str(places["work"] / f".ssh-{tag}.sock"),
             str(places["repo"] / "db.sock"), str(places["outside"] / "engine.sock")]
    home = caller_identity().home
    for directory in [home, *python_prefixes()]:
        # The home is a tmpfs inside; a prefix is bound read-only (the venv's, the base's).
        if os.access(directory, os.W_OK):
            paths.append(os.path.join(directory, f".gvh-{tag}.sock"))
    return [p for p in paths if len(p.encode()) < 108]


@contextlib.contextmanager
def host_sockets(paths: list[str]) -> Iterator[HostSockets]:
    sockets = HostSockets(paths, f"gvh-{uuid.uuid4().hex[:10]}")
    try:
        yield sockets
    finally:
        sockets.close()


NETWORKS = {"off": False, "allowlist": "ALLOWED", "public": True, "host": "host"}
FLAVOURS = ("one-shot", "reused", "session")


def run(flavour: str, argv: list[str], work: Path, repo: Path, network: object):
    if flavour == "session":
        with IsolatedSession(work, repo, mode="runsc", network=network) as session:
            return session.run(argv, timeout=TIMEOUT)
    if flavour == "reused":
        run_command_isolated("true", working_dir=work, repo_path=repo, mode="runsc",
                             network=network, timeout=TIMEOUT)
        try:
            result = run_command_isolated(argv, working_dir=work, repo_path=repo,
                                          mode="runsc", network=network, timeout=TIMEOUT,
                                          reuse=True)
        finally:
            POOL.reset()
        assert "reused" in result.details, result.describe()
        return result
    return run_command_isolated(argv, working_dir=work, repo_path=repo, mode="runsc",
                                network=network, timeout=TIMEOUT, reuse=False)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("setting", list(NETWORKS))
def test_no_host_socket_is_reachable_whatever_the_network(setting, flavour, places,
                                                          runsc_works, request):
    paths = socket_paths(places)
    with plain_server() as allowed, host_sockets(paths) as sockets:
        network = NETWORKS[setting]
        if network == "ALLOWED":
            network = [allowed.authority]
        url = f"{allowed.url}/through-the-proxy" if setting == "allowlist" else ""
        result = run(flavour, [PYTHON, "-I", "-c", PROBE, json.dumps(paths),
                               sockets.abstract, url], places["work"], places["repo"],
                     network)
        assert result.isolated and result.success, result.describe() + result.stderr[-2000:]
        found = json.loads(result.stdout.strip().splitlines()[-1])
    # The host's evidence first: no server saw anything. The verdict goes into the
    # security report's probe table (scripts/security_report.py), as Probe.verdict's do.
    reached = [p for p in [*paths, "abstract"] if not found[p].startswith("ERR")]
    request.node.user_properties.append(("security", {
        "probe": f"host Unix sockets in the mounts (network {setting})", "backend": "runsc",
        "flavour": flavour, "outcome": "LEAKED" if sockets.connected or reached else "blocked",
        "evidence": f"host saw {sockets.connected}, inside connected to {reached}"[:300]}))
    assert sockets.connected == [], f"host sockets reached ({setting}, {flavour}): " \
                                    f"{sockets.connected}"
    for path in [*paths, "abstract"]:
        assert found[path].startswith("ERR"), (path, found)
    assert found["sockets_held"] == [], "a command holds a socket (the channel's?)"
    if setting == "allowlist":
        # The sandbox's own proxy is still there, over its channel.
        assert found["proxied"] == 200, found
        assert allowed.hits == ["GET /through-the-proxy"]
    else:
        assert allowed.hits == []


KERNEL_PROBE = r'''
import json, os, socket, sys
paths, own = json.loads(sys.argv[1]), sys.argv[2]
found = {}
for path in paths:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
        found[path] = "ok"
    except OSError as exc:
        found[path] = "ERR %s" % (exc.errno,)
    s.close()
# What --host-uds=create is for: a socket made here, which the host connects to.
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(own)
server.listen(1)
server.settimeout(50)
conn, _ = server.accept()
conn.sendall(b"made-inside")
conn.close()
print(json.dumps(found))
'''


@pytest.mark.parametrize("setting", ["off", "allowlist", "public"])
def test_a_kernel_sandbox_makes_its_own_sockets_but_reaches_no_host_socket(
        setting, places, runsc_works):
    """A gVisor kernel's sandbox (``kernel_dir``: ``--host-uds=create``, for its ZMQ
    sockets): the host reaches a socket made inside, the sandbox reaches none of the host's,
    not even in its own read-write kernel dir, nor with a proxied network."""
    paths = [*socket_paths(places), str(places["kernel"] / "host.sock"),
             str(places["pypath"] / "host.sock")]
    own = str(places["kernel"] / "made-inside.sock")
    network = {"off": False, "allowlist": ["127.0.0.1:9"], "public": True}[setting]
    spec = SandboxSpec.build(places["work"], places["repo"], network=network,
                             kernel_dir=places["kernel"], python_path=[str(places["pypath"])])
    with host_sockets(paths) as sockets, IsolatedSession.for_spec(spec, mode="runsc") as session:
        outcome: list = []
        runner = threading.Thread(target=lambda: outcome.append(session.run(
            [PYTHON, "-I", "-c", KERNEL_PROBE, json.dumps(paths), own], timeout=TIMEOUT)))
        runner.start()
        try:
            deadline = time.monotonic() + TIMEOUT
            while not os.path.exists(own):
                assert runner.is_alive() and time.monotonic() < deadline, outcome
                time.sleep(0.05)
            answer = b""
            while not answer:  # bound before it listens: retry until it accepts
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                    client.settimeout(10)
                    try:
                        client.connect(own)
                        answer = client.recv(100)
                    except ConnectionRefusedError:
                        assert time.monotonic() < deadline, "the sandbox's socket never listened"
                        time.sleep(0.05)
        finally:
            runner.join(TIMEOUT + 30)
    result = outcome[0]
    assert result.isolated and result.success, result.describe() + result.stderr[-2000:]
    assert answer == b"made-inside"
    assert sockets.connected == [], sockets.connected
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(found[p].startswith("ERR") for p in paths), found


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_no_host_socket_is_reachable_on_docker(flavour, places, docker_works, request):
    """Docker's runsc runtime runs without any --host-uds (and refuses proxied networks):
    the same sockets stay unreached there, one-shot, reused and in a session."""
    paths = socket_paths(places)
    argv = [PYTHON, "-I", "-c", PROBE, json.dumps(paths), "", ""]
    with host_sockets(paths) as sockets:
        argv[-2] = sockets.abstract
        work, repo = places["work"], places["repo"]
        if flavour == "session":
            with IsolatedSession(work, repo, mode="docker") as session:
                result = session.run(argv, timeout=TIMEOUT)
        else:
            reused = flavour == "reused"
            if reused:
                run_command_isolated("true", working_dir=work, repo_path=repo, mode="docker",
                                     timeout=TIMEOUT)
            try:
                result = run_command_isolated(argv, working_dir=work, repo_path=repo,
                                              mode="docker", timeout=TIMEOUT, reuse=reused)
            finally:
                POOL.reset()
            assert not reused or "reused" in result.details, result.describe()
        assert result.isolated and result.success, result.describe() + result.stderr[-2000:]
        found = json.loads(result.stdout.strip().splitlines()[-1])
    reached = [p for p in [*paths, "abstract"] if not found[p].startswith("ERR")]
    request.node.user_properties.append(("security", {
        "probe": "host Unix sockets in the mounts (network off)", "backend": "docker",
        "flavour": flavour, "outcome": "LEAKED" if sockets.connected or reached else "blocked",
        "evidence": f"host saw {sockets.connected}, inside connected to {reached}"[:300]}))
    assert sockets.connected == [], sockets.connected
    assert reached == [], found
