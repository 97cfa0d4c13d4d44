"""Tests for ``gvisor-magic install --docker`` (and ``--check --docker``).

daemon.json merging runs on temp copies of realistic files, both through the script (as a
subprocess, ``--no-reload``) and through ``register_runtime`` directly. The rest talks to the
real dockerd over /var/run/docker.sock: a real container under runsc, a real SIGHUP, and one
real (idempotent) ``--docker`` run against the real /etc/docker/daemon.json. A fake dockerd
on a temp unix socket shows that a failing probe is reported as a failure.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import gvisor_magic.install.runsc as inst

ROOT = Path(__file__).resolve().parents[1]
SOCKET = "/var/run/docker.sock"


dr = inst.docker_runtime
_METHOD = inst.choose_method("auto", inst.read_os_release())
_FOUND = inst.runsc_candidates(_METHOD, inst.DEFAULT_PREFIX)  # what the script will register
RUNSC = os.path.abspath(_FOUND[0]) if _FOUND else ""
ENTRY = {"path": RUNSC, "runtimeArgs": ["--network=none", "--directfs=false"]}
REALISTIC = {
    "log-driver": "json-file",
    "storage-driver": "overlay2",
    "registry-mirrors": [],
    "runtimes": {"nvidia": {"path": "nvidia-container-runtime"}},
}

needs_runsc = pytest.mark.skipif(not RUNSC, reason="no runsc installed (make system installs it)")
needs_docker = pytest.mark.skipif(
    not os.path.exists(SOCKET), reason=f"no Docker daemon here ({SOCKET} is absent)"
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="editing /etc/docker needs root")


def _script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).with_name("gvisor-magic")), "install", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        check=False,
    )


Register = Callable[[Path], tuple[int, str]]


@pytest.fixture(params=["script", "function"])
def register(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]) -> Register:
    """Register runsc in a daemon.json: (exit status, everything printed)."""

    def via_script(path: Path) -> tuple[int, str]:
        result = _script("--docker", "--daemon-json", str(path), "--no-reload")
        return result.returncode, result.stdout + result.stderr

    def via_function(path: Path) -> tuple[int, str]:
        try:
            dr.register_runtime(path, RUNSC)
            status, message = 0, ""
        except dr.DockerError as exc:
            status, message = exc.exit_code, f"error: {exc}"
        return status, capsys.readouterr().out + message

    return via_script if request.param == "script" else via_function


def _backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.bak-*"))


# --- daemon.json merging -------------------------------------------------------------------------


@needs_runsc
def test_absent_file_and_directory_are_created(register: Register, tmp_path: Path) -> None:
    path = tmp_path / "etc" / "docker" / "daemon.json"
    status, output = register(path)
    assert status == 0, output
    assert json.loads(path.read_text()) == {"runtimes": {"runsc": ENTRY}}
    assert path.stat().st_mode & 0o777 == 0o644
    assert _backups(path) == [] and "registered runtime 'runsc'" in output
    assert sorted(p.name for p in path.parent.iterdir()) == ["daemon.json"]  # no temp file left


@needs_runsc
@pytest.mark.parametrize("old", [b"", b"\n  \n", b"{}", b"{}\n"])
def test_empty_file_counts_as_empty_object(register: Register, tmp_path: Path, old: bytes):
    path = tmp_path / "daemon.json"
    path.write_bytes(old)
    status, output = register(path)
    assert status == 0, output
    assert json.loads(path.read_text()) == {"runtimes": {"runsc": ENTRY}}
    [backup] = _backups(path)
    assert backup.read_bytes() == old  # the backup holds the old content


@needs_runsc
def test_other_keys_and_runtimes_are_kept_exactly(register: Register, tmp_path: Path) -> None:
    path = tmp_path / "daemon.json"
    old = json.dumps(REALISTIC, indent=4).encode()
    path.write_bytes(old)
    path.chmod(0o644)
    status, output = register(path)
    assert status == 0, output
    new = json.loads(path.read_text())
    assert new == {**REALISTIC, "runtimes": {**REALISTIC["runtimes"], "runsc": ENTRY}}
    assert list(new) == list(REALISTIC)  # key order kept too
    assert path.stat().st_mode & 0o777 == 0o644
    [backup] = _backups(path)
    assert backup.read_bytes() == old
    assert "backed up" in output


@needs_runsc
def test_existing_runsc_entry_keeps_its_args(register: Register, tmp_path: Path) -> None:
    path = tmp_path / "daemon.json"
    runtimes = {"runsc": {"path": RUNSC, "runtimeArgs": ["--platform=ptrace"]}}
    path.write_text(json.dumps({"debug": True, "runtimes": runtimes}))
    status, output = register(path)
    assert status == 0, output
    entry = json.loads(path.read_text())["runtimes"]["runsc"]
    assert entry == {"path": RUNSC,
                     "runtimeArgs": ["--platform=ptrace", "--network=none", "--directfs=false"]}
    assert len(_backups(path)) == 1


@needs_runsc
def test_already_registered_is_left_alone(register: Register, tmp_path: Path) -> None:
    path = tmp_path / "daemon.json"
    path.write_text(json.dumps({**REALISTIC, "runtimes": {"runsc": ENTRY}}))  # not our layout
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    status, output = register(path)
    assert status == 0, output
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert _backups(path) == [] and "already registered" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["daemon.json"]


@needs_runsc
@pytest.mark.parametrize(
    ("old", "message"),
    [
        (b'{"runtimes": ', "is not valid JSON (line 1 column 14"),
        (b'{"a": 1,\n "b": }', "is not valid JSON (line 2 column 7"),
        (b'["runtimes"]', "the top level is an array, but dockerd expects a JSON object"),
        (b'"runsc"', "the top level is a string"),
        (b'{"runtimes": []}', "'runtimes' is an array, not an object"),
        (b'{"runtimes": {"runsc": "/usr/bin/runsc"}}', "runtimes.runsc is a string"),
        (b'{"runtimes": {"runsc": {"runtimeArgs": "x"}}}', "runtimeArgs is not a list"),
    ],
)
def test_bad_file_is_an_error_and_left_untouched(
    register: Register, tmp_path: Path, old: bytes, message: str
) -> None:
    path = tmp_path / "daemon.json"
    path.write_bytes(old)
    status, output = register(path)
    assert status == 1, output
    assert f"error: {path}" in output and message in output and "left it unchanged" in output
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["daemon.json"]  # no backup, no temp


def test_other_network_flag_is_replaced_and_private_mode_kept(tmp_path: Path, capsys) -> None:
    path = tmp_path / "daemon.json"
    old = {"runtimes": {"gvisor": {"path": "/opt/runsc", "runtimeArgs": ["--network=host", "-x"]}}}
    path.write_text(json.dumps(old))
    path.chmod(0o600)
    assert dr.register_runtime(path, "/usr/bin/runsc", "gvisor") is True
    entry = json.loads(path.read_text())["runtimes"]["gvisor"]
    assert entry == {"path": "/usr/bin/runsc",
                     "runtimeArgs": ["-x", "--network=none", "--directfs=false"]}
    assert path.stat().st_mode & 0o777 == 0o600
    assert _backups(path)[0].stat().st_mode & 0o777 == 0o600  # the backup is no more readable
    assert "replacing --network=host" in capsys.readouterr().out
    assert dr.register_runtime(path, "/usr/bin/runsc", "gvisor") is False


def test_reserved_runtime_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(dr.DockerError, match="'runc' is reserved"):
        dr.register_runtime(tmp_path / "daemon.json", "/usr/bin/runsc", "runc")
    assert list(tmp_path.iterdir()) == []


def test_docker_options_need_docker() -> None:
    result = _script("--no-reload", "--runtime-name", "x")
    assert result.returncode == 2
    assert "--runtime-name, --no-reload: only with --docker" in result.stderr


# --- finding dockerd, and its output framing -----------------------------------------------------


def test_dockerd_pids_and_config_file(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for pid, name, argv in [(10, "dockerd", "dockerd\0--config-file\0/srv/d.json\0"),
                            (11, "containerd", "containerd\0"), (12, "dockerd", "dockerd\0")]:
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "comm").write_text(name + "\n")
        (proc / str(pid) / "cmdline").write_text(argv)
    pid_file = tmp_path / "docker.pid"
    pid_file.write_text("12")
    assert dr.dockerd_pids(pid_file, proc) == [12]
    pid_file.write_text("11")  # stale: that pid is no dockerd now
    assert dr.dockerd_pids(pid_file, proc) == [10, 12]
    assert dr.dockerd_pids(tmp_path / "missing.pid", proc) == [10, 12]
    assert dr.dockerd_config_file(10, proc) == Path("/srv/d.json")
    assert dr.dockerd_config_file(12, proc) == dr.DAEMON_JSON


def test_demux_logs() -> None:
    framed = b"\x01\0\0\0\0\0\0\x064.4.0\n" + b"\x02\0\0\0\0\0\0\x04oops"
    assert dr.demux_logs(framed) == "4.4.0\noops"
    assert dr.demux_logs(b"4.4.0\n") == "4.4.0\n"  # a TTY container's output is not framed
    assert dr.demux_logs(b"") == ""


# --- a fake dockerd: failing probes must be reported as failures ---------------------------------


class _FakeDocker(http.server.BaseHTTPRequestHandler):
    """Answers like dockerd; ``server.script`` maps "METHOD /path-prefix" to replies."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _reply(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.calls.append((self.command, self.path, body))  # type: ignore[attr-defined]
        status, reply = 404, {"message": f"no fake route for {self.path}"}
        for key, answer in self.server.script.items():  # type: ignore[attr-defined]
            method, prefix = key.split(" ", 1)
            if method == self.command and self.path.startswith(prefix):
                status, reply = answer
                break
        data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _reply


def _frame(text: str) -> bytes:
    return b"\x01\0\0\0" + len(text).to_bytes(4, "big") + text.encode()


FAKE_INFO = {
    "ServerVersion": "fake",
    "Runtimes": {"runc": {"path": "runc"}, "gvisor": {"path": "/opt/runsc", "runtimeArgs": [
        "--network=none", "--directfs=false"]}},
}
FAKE_OK = {
    "GET /info": (200, FAKE_INFO),
    "GET /images/": (200, {}),
    "POST /containers/create": (201, {"Id": "c0ffee"}),
    "POST /containers/c0ffee/start": (204, b""),
    "POST /containers/c0ffee/wait": (200, {"StatusCode": 0}),
    "GET /containers/c0ffee/logs": (200, _frame("4.4.0\n")),
    "DELETE /containers/c0ffee": (204, b""),
}
NETWORK_ERROR = (
    "OCI runtime create failed: cannot run with network enabled in root network namespace"
)


@pytest.fixture
def fake_docker() -> Iterator[socketserver.UnixStreamServer]:
    """A fake dockerd on a short temp socket path (sun_path is limited to 108 bytes)."""
    tmp = tempfile.mkdtemp(prefix="fake-dockerd-")
    server = socketserver.ThreadingUnixStreamServer(os.path.join(tmp, "s"), _FakeDocker)
    server.daemon_threads = True
    server.script, server.calls = dict(FAKE_OK), []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
        shutil.rmtree(tmp)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({}, None),
        ({"POST /containers/c0ffee/start": (500, {"message": NETWORK_ERROR})},
         f"starting the probe container: HTTP 500: {NETWORK_ERROR}"),
        ({"POST /containers/create": (400, {"message": "Unknown runtime specified gvisor"})},
         "creating the probe container: HTTP 400: Unknown runtime specified gvisor"),
        ({"POST /containers/c0ffee/wait": (200, {"StatusCode": 127}),
          "GET /containers/c0ffee/logs": (200, _frame("exec: not found\n"))},
         "exited with status 127; output: 'exec: not found'"),
        ({"GET /containers/c0ffee/logs": (200, _frame("6.1.0-13-amd64\n"))},
         "printed '6.1.0-13-amd64', not gVisor's '4.4.0'"),
        ({"GET /info": (200, {"Runtimes": {"gvisor": {"path": "/opt/runsc"}}})},
         "MISSING --network=none"),
        ({"GET /info": (200, {"Runtimes": {"gvisor": {
            "path": "/opt/runsc", "runtimeArgs": ["--network=none"]}}})},
         "MISSING --directfs=false"),
    ],
)
def test_check_reports_each_failing_step(fake_docker, capsys, change, message) -> None:
    fake_docker.script.update(change)
    status = dr.check_docker(socket_path=fake_docker.server_address)
    out = capsys.readouterr().out
    assert "docker runtime: 'gvisor' -> /opt/runsc" in out  # found by its path, not its name
    if message is None:
        assert status == 0 and "printed 4.4.0 (gVisor's kernel) [works]" in out
    else:
        assert status == 1 and message in out and "fix:" in out
        assert "[works]" not in out
    created = [c for c in fake_docker.calls if c[:2] == ("POST", "/containers/create")]
    if created and change.get("POST /containers/create", (201,))[0] == 201:
        spec = json.loads(created[0][2])
        assert spec["HostConfig"]["Runtime"] == "gvisor"
        assert spec["HostConfig"]["NetworkMode"] == "none"
        assert spec["HostConfig"]["ReadonlyRootfs"] is True
        assert spec["HostConfig"]["AutoRemove"] is False
        assert "/usr:/usr:ro" in spec["HostConfig"]["Binds"]
        assert ("DELETE", "/containers/c0ffee?force=1&v=1", b"") in fake_docker.calls


def test_check_reports_a_missing_probe_image_and_creates_nothing(fake_docker, capsys) -> None:
    fake_docker.script = {**FAKE_OK, "GET /images/": (404, {"message": "no such image"}),
                          "POST /images/create": (200, b'{"status":"sha256:0"}\n')}
    assert dr.check_docker(socket_path=fake_docker.server_address) == 1
    out = capsys.readouterr().out
    assert "docker probe: NOT RUN: the probe's image gvisor-magic/scratch:latest is not" in out
    assert "[works]" not in out
    assert "fix: create it (empty, from an empty tar" in out
    assert dr.create_image_command() in out
    assert [c[:2] for c in fake_docker.calls if c[0] != "GET"] == []  # no create of any kind


def test_ensure_probe_image_creates_a_missing_one(fake_docker, capsys) -> None:
    fake_docker.script = {**FAKE_OK, "GET /images/": (404, {"message": "no such image"}),
                          "POST /images/create": (200, b'{"status":"sha256:0"}\n')}
    dr.ensure_probe_image(socket_path=fake_docker.server_address)
    [(_, path, body)] = [c for c in fake_docker.calls if c[1].startswith("/images/create")]
    assert path == "/images/create?fromSrc=-&repo=gvisor-magic%2Fscratch&tag=latest"
    assert body and set(body) == {0}  # an empty tar: only zero blocks
    fake_docker.script["POST /images/create"] = (200, b'{"error":"disk full"}\n')
    fake_docker.script["GET /images/"] = (404, {"message": "no such image"})
    with pytest.raises(dr.DockerError, match=r"creating the empty image .*: disk full"):
        dr.ensure_probe_image(socket_path=fake_docker.server_address)


def test_unreachable_daemon_is_reported(tmp_path: Path, capsys) -> None:
    assert dr.check_docker(socket_path=str(tmp_path / "none.sock")) == 1
    out = capsys.readouterr().out
    assert "docker daemon: NOT reachable" in out and "no Docker socket at" in out


# --- the real dockerd ----------------------------------------------------------------------------


def _our_containers() -> list[str]:
    """``docker ps -aq``, minus containers other test suites label as theirs (they may run
    at the same moment); whatever is left must not change."""
    def ids(*extra: str) -> list[str]:
        cmd = ["docker", "ps", "-aq", "--no-trunc", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
    others = set(ids("--filter", "label=gvisor-magic-test"))
    return sorted(set(ids()) - others)


@pytest.fixture
def no_new_containers() -> Iterator[None]:
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI")
    before = _our_containers()
    yield
    assert _our_containers() == before
    assert not subprocess.run(["docker", "ps", "-aq", "--filter", "label=gvisor-magic.probe"],
                              capture_output=True, text=True, check=True).stdout.strip()


@needs_docker
def test_check_docker_on_the_real_daemon(no_new_containers: None) -> None:
    dr.ensure_probe_image()  # as the Docker backend does on its first run: --check makes none
    result = _script("--check", "--docker")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "docker daemon: reachable" in result.stdout
    assert "--network=none" in result.stdout
    assert "printed 4.4.0 (gVisor's kernel) [works]" in result.stdout


@needs_docker
def test_check_docker_with_unknown_runtime_fails(no_new_containers: None) -> None:
    result = _script("--check", "--docker", "--runtime-name", "nosuch")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "NOT registered: no runtime 'nosuch'" in result.stdout
    assert "--docker --runtime-name nosuch" in result.stdout  # the fix names it too


@needs_docker
def test_real_probe_failures_name_the_step(no_new_containers: None) -> None:
    with pytest.raises(dr.DockerError, match=r"(creating|starting) the probe container: .*nosuch"):
        dr.probe_container("nosuch")
    assert dr.probe_container("runc") != dr.GVISOR_KERNEL  # runc shows the host's kernel


@needs_docker
def test_real_probe_image_is_created_when_missing() -> None:
    image = f"gvisor-magic/scratch-test:{os.getpid()}"
    try:
        dr.ensure_probe_image(image)
        status, _ = dr.docker_api("GET", f"/images/{image}/json", ok=(200,))
        assert status == 200
    finally:
        with contextlib.suppress(dr.DockerError):
            dr.docker_api("DELETE", f"/images/{image}?force=1")


@needs_docker
def test_real_check_without_the_probe_image_creates_nothing(no_new_containers: None,
                                                             capsys) -> None:
    """``--check --docker`` where the daemon lacks the probe's image: it says so and what would
    be created, and the daemon has no such image afterwards. (An image of this test's own,
    absent: the shared one is in use by other suites, and deleting it would disturb them.)"""
    image = f"gvisor-magic/scratch-check-test:{os.getpid()}"

    def exists() -> bool:  # asked of the daemon through its own CLI
        return subprocess.run(["docker", "image", "inspect", image], capture_output=True,
                              timeout=60).returncode == 0

    assert not exists()
    try:
        status = dr.check_docker(image=image)
        out = capsys.readouterr().out
        assert status == 1, out
        assert f"docker probe: NOT RUN: the probe's image {image} is not on the daemon" in out
        assert "so it was not created" in out and dr.create_image_command(image) in out
        assert not exists(), "the check created the probe image"
        # The command the fix prints does make the image, and the check then runs the probe.
        made = subprocess.run(["sh", "-c", dr.create_image_command(image)], capture_output=True,
                              text=True, timeout=120)
        assert made.returncode == 0, made.stderr
        status = dr.check_docker(image=image)
        out = capsys.readouterr().out
        assert status == 0 and "printed 4.4.0 (gVisor's kernel) [works]" in out, out
    finally:
        with contextlib.suppress(dr.DockerError):
            dr.docker_api("DELETE", f"/images/{image}?force=1")


@needs_docker
@needs_root
@needs_runsc
def test_register_on_the_real_daemon_json() -> None:
    """The one run against the real file: it is idempotent, so normally nothing changes."""
    result = _script("--docker")
    assert result.returncode == 0, result.stdout + result.stderr
    entry = (dr.docker_info().get("Runtimes") or {}).get("runsc")
    assert entry and entry["path"] == RUNSC and "--network=none" in entry["runtimeArgs"]
    assert json.loads(dr.DAEMON_JSON.read_text())["runtimes"]["runsc"] == entry


@needs_docker
@needs_root
def test_real_sighup_reload_keeps_dockerd_and_runtime() -> None:
    pids = [p for p in dr.dockerd_pids()
            if os.path.realpath(dr.dockerd_config_file(p)) == str(dr.DAEMON_JSON)]
    if not pids:
        pytest.skip("the running dockerd does not read /etc/docker/daemon.json")
    dr.reload_dockerd(pids)  # re-reads the unchanged file
    entry = dr.wait_for_runtime("runsc", RUNSC or "/usr/bin/runsc")
    assert "--network=none" in entry["runtimeArgs"]
    assert dr.dockerd_pids() == pids  # still the same daemon


@needs_docker
def test_file_dockerd_does_not_read_is_no_reason_to_signal_it(tmp_path: Path) -> None:
    """Even without --no-reload, editing a file that dockerd does not read sends no SIGHUP."""
    if not RUNSC:
        pytest.skip("no runsc installed")
    path = tmp_path / "daemon.json"
    result = _script("--docker", "--daemon-json", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    if dr.dockerd_pids():
        assert f"not {path}; leaving it alone" in result.stdout
    assert "SIGHUP" not in result.stdout
