"""Docker going wrong: a missing runsc runtime, and dockerd dying mid-command.

dockerd is killed for real, so this uses a private daemon of its own (own
socket, data root and containerd), never the machine's shared one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pytest

from gvisor_magic import IsolationUnavailable, run_command_isolated
from gvisor_magic.backends.docker import DockerBackend
from gvisor_magic.errors import SandboxStartError

IN_CI = os.environ.get("CI") == "true"


def test_missing_runsc_runtime_is_refused_with_the_fix(docker_works, tmp_path, monkeypatch):
    monkeypatch.setenv("GVISOR_MAGIC_DOCKER_RUNTIME", "no-such-runtime")
    marker = tmp_path / "ran"
    with pytest.raises(IsolationUnavailable, match="no runtime named 'no-such-runtime'") as caught:
        run_command_isolated(f"touch {marker}", mode="docker")
    assert f"sudo {sys.executable} -m gvisor_magic.install --docker" in \
        caught.value.reasons["docker"]
    assert not marker.exists()


def test_a_runtime_without_directfs_off_is_refused():
    backend = DockerBackend()
    with pytest.raises(SandboxStartError, match="read-only mounts") as caught:
        backend._checked("runsc", {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none"]})
    assert "--docker" in caught.value.fix


def _unmount_below(base: str) -> None:
    with open("/proc/self/mountinfo") as handle:
        points = [line.split()[4] for line in handle]
    for point in sorted((p for p in points if p.startswith(base + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


@pytest.fixture
def private_dockerd(docker_works):
    """A throw-away dockerd with the runsc runtime, removed with everything it started."""
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    runsc = shutil.which("runsc") or "/usr/bin/runsc"
    base = tempfile.mkdtemp(prefix="gvm-dockerd-", dir="/var/tmp")
    sock = os.path.join(base, "docker.sock")
    config = os.path.join(base, "daemon.json")
    with open(config, "w") as handle:
        json.dump({"runtimes": {
            "runsc": {"path": runsc, "runtimeArgs": ["--network=none", "--directfs=false"]},
            # Accepted by dockerd, refused by runsc when the container starts.
            "runsc-broken": {"path": runsc, "runtimeArgs": [
                "--network=none", "--directfs=false", "--platform=no-such-platform"]},
        }}, handle)
    log = open(os.path.join(base, "dockerd.log"), "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [dockerd, "--config-file", config, "-H", f"unix://{sock}",
         "--data-root", os.path.join(base, "data"), "--exec-root", os.path.join(base, "exec"),
         "--pidfile", os.path.join(base, "docker.pid"), "--bridge=none", "--iptables=false",
         "--ip-masq=false"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            log.close()
            with open(os.path.join(base, "dockerd.log")) as handle:
                tail = handle.read()[-2000:]
            shutil.rmtree(base, ignore_errors=True)
            pytest.fail(f"the private dockerd did not start:\n{tail}")
        time.sleep(0.2)
    family = _tree(proc.pid)
    try:
        yield proc, f"unix://{sock}", base
    finally:
        family += _tree(proc.pid)
        for process in family:
            with contextlib.suppress(psutil.Error):
                process.kill()
        proc.wait(timeout=30)
        log.close()
        _unmount_below(base)  # a killed dockerd leaves its netns bind mounts behind
        shutil.rmtree(base, ignore_errors=True)
        assert not os.path.exists(base), f"could not remove {base}"


def test_dockerd_dying_mid_command_is_reported_not_rerun(private_dockerd, tmp_path,
                                                          monkeypatch):
    proc, host, _base = private_dockerd
    monkeypatch.setenv("DOCKER_HOST", host)
    marker = tmp_path / "runs.log"
    started = threading.Event()

    def kill_daemon() -> None:
        started.wait(60)
        os.kill(proc.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_daemon)
    killer.start()
    begin = time.monotonic()
    result = run_command_isolated(  # writes="direct": the marker shows each run on the host
        f"echo ran >> {marker}; echo started; sleep 600", mode="docker", working_dir=tmp_path,
        timeout=300, on_output=lambda stream, text: started.set(), writes="direct")
    killer.join()
    assert time.monotonic() - begin < 90, "a lost daemon must not hang the caller"
    assert result.backend == "docker" and not result.success
    assert result.error and "Docker daemon" in result.error
    assert result.returncode == 125
    assert result.stdout == "started\n"
    assert marker.read_text() == "ran\n", "the command must not run again"
    # The command ran inside gVisor's kernel, so what could survive on the host is the
    # container's shim and runsc processes: none may be left.
    cid = result.details["container_id"]
    leftover = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                if any(cid in part for part in p.info["cmdline"] or [])]
    assert not leftover, f"the container's processes survived their daemon: {leftover}"


def test_a_container_that_fails_to_start_leaves_nothing(private_dockerd, tmp_path, monkeypatch):
    proc, host, base = private_dockerd
    monkeypatch.setenv("DOCKER_HOST", host)
    monkeypatch.setenv("GVISOR_MAGIC_DOCKER_RUNTIME", "runsc-broken")
    marker = tmp_path / "ran"
    with pytest.raises(IsolationUnavailable) as caught:
        run_command_isolated(f"touch {marker}", mode="docker", working_dir=tmp_path)
    assert "no-such-platform" in caught.value.reasons["docker"]
    assert not marker.exists()
    daemon = {p.pid for p in _tree(proc.pid) if p.name() in ("dockerd", "containerd")}
    left = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
            if p.pid not in daemon and any(base in part for part in p.info["cmdline"] or [])]
    assert not left, f"a failed start left processes behind: {left}"
    import docker

    assert docker.DockerClient(base_url=host).containers.list(all=True) == []


def test_a_container_created_for_a_caller_that_died_is_removed_later(docker_works):
    """dockerd finishes a create even when its caller died during the call: the container is
    never started, and the next run sweeps it away (never one whose owner lives, nor a young
    one another process may be about to start)."""
    import docker

    from gvisor_magic.backends.docker import LABEL, remove_orphan_containers
    from gvisor_magic.backends.docker_image import ensure_scratch_image

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs
    client = docker.from_env(timeout=30)
    api = client.api
    image = ensure_scratch_image(client)

    def create(owner: int) -> str:
        return api.create_container(image, command=["true"], labels={
            LABEL: "1", f"{LABEL}.owner-pid": str(owner)})["Id"]

    orphan, alive = create(gone.pid), create(os.getpid())
    try:
        assert remove_orphan_containers(api, min_age=3600, force=True) == []  # too young
        removed = remove_orphan_containers(api, min_age=0, force=True)
        assert orphan in removed and alive not in removed
        left = {c["Id"] for c in api.containers(all=True, filters={"label": f"{LABEL}=1"})}
        assert orphan not in left and alive in left
    finally:
        for cid in (orphan, alive):
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_container(cid, force=True)
        client.close()
