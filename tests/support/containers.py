"""Run Python inside a plain runc container, the way a Kubernetes pod runs a notebook kernel.

The image is the package's empty scratch image; the host's system directories
(``/usr``, ``/etc``...), hence its ``runsc`` and ``/usr/bin/python3``, are bound
in read-only, and a world-readable copy of ``gvisor_magic`` plus its dependencies
is bound read-only and put on ``PYTHONPATH``. Containers carry the label
``gvisor-magic-test=1`` (and a per-session one) and are always removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LABEL = "gvisor-magic-test"
#: Distinguishes this session's containers from those of concurrent test runs.
SESSION = secrets.token_hex(6)
LABELS = {LABEL: "1", f"{LABEL}-session": SESSION}
CONTAINER_PYTHON = "/usr/bin/python3"
SITE_MOUNT = "/opt/gvm-site"
#: Printed by the in-container script before its JSON document.
RESULT_MARKER = "@@gvm-result@@"
#: Host system directories, bound read-only at the same path. Merged-/usr
#: symlinks (/bin -> usr/bin) are bound from their target instead.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")

#: What a pod securityContext can grant so that runsc works inside (see NOTES.md).
PRIVILEGED = {
    "cap_add": ["SYS_ADMIN", "SYS_PTRACE"],
    "security_opt": ["seccomp=unconfined", "apparmor=unconfined"],
}


class DockerUnavailable(Exception):
    """No Docker daemon answers, or the SDK is missing."""


def docker_client():
    """A connected ``docker.DockerClient``, or ``DockerUnavailable`` saying why."""
    try:
        import docker
        import docker.errors
    except ImportError as exc:
        raise DockerUnavailable(f"the docker SDK is not installed: {exc}") from exc
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as exc:  # DockerException, requests errors, socket errors...
        raise DockerUnavailable(
            f"no Docker daemon answers ({exc}); start one with "
            "`python3 scripts/with_dockerd.py -- <pytest command>`") from exc
    return client


def mounts_for(site: str, extra: Sequence[tuple[str, str]] = ()) -> list:
    """Read-only binds: system dirs (merged-usr aware), the site dir, ``extra`` (target, source)."""
    from docker.types import Mount

    mounts = []
    for path in SYSTEM_DIRS:
        if not os.path.exists(path):
            continue
        mounts.append(Mount(target=path, source=os.path.realpath(path), type="bind",
                            read_only=True))
    mounts.append(Mount(target=SITE_MOUNT, source=site, type="bind", read_only=True))
    for target, source in extra:
        mounts.append(Mount(target=target, source=source, type="bind", read_only=True))
    return mounts


def build_site(dest: str) -> None:
    """Install the package's dependencies and a copy of ``gvisor_magic`` into ``dest``."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-warn-script-location", "--target", dest, "psutil", "docker"],
        check=True, stdin=subprocess.DEVNULL)
    shutil.copytree(ROOT / "gvisor_magic", Path(dest) / "gvisor_magic",
                    ignore=shutil.ignore_patterns("__pycache__"))
    os.chmod(dest, 0o755)
    for path in Path(dest).rglob("*"):
        if path.is_symlink():
            continue
        os.chmod(path, 0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)


@dataclass
class ContainerRun:
    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool

    def result(self) -> dict:
        """The JSON document the script printed after ``RESULT_MARKER``."""
        for line in reversed(self.stdout.splitlines()):
            if line.startswith(RESULT_MARKER):
                return json.loads(line[len(RESULT_MARKER):])
        raise AssertionError(
            f"the in-container script printed no result (exit {self.exit_code}, "
            f"timed out: {self.timed_out})\nstdout:\n{self.stdout[-3000:]}\n"
            f"stderr:\n{self.stderr[-3000:]}")


def run_python(client, site: str, script: str, *, user: str | None = None,
               environment: Mapping[str, str] | None = None,
               cap_add: Sequence[str] | None = None, security_opt: Sequence[str] | None = None,
               tmpfs: Mapping[str, str] | None = None,
               extra_mounts: Sequence[tuple[str, str]] = (), timeout: float = 60) -> ContainerRun:
    """Run ``/usr/bin/python3 -c script`` in a fresh runc container; always remove it."""
    import docker.errors
    import requests

    from gvisor_magic.backends.docker_image import ensure_scratch_image

    image = ensure_scratch_image(client)
    env = {"PYTHONPATH": SITE_MOUNT, "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
           "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/tmp"}
    env.update(environment or {})
    # Docker's own default for a tmpfs is noexec; say so explicitly.
    mounts_tmpfs = {"/tmp": "rw,nosuid,nodev,noexec,mode=1777,size=256m"}
    mounts_tmpfs.update(tmpfs or {})
    container = client.containers.create(
        image, [CONTAINER_PYTHON, "-c", script], runtime="runc",
        labels=dict(LABELS), mounts=mounts_for(site, extra_mounts), tmpfs=mounts_tmpfs,
        environment=env, user=user, network_mode="none",
        cap_add=list(cap_add) if cap_add else None,
        security_opt=list(security_opt) if security_opt else None,
        name=f"gvm-test-{secrets.token_hex(4)}")
    timed_out = False
    exit_code = None
    try:
        container.start()
        try:
            exit_code = container.wait(timeout=timeout).get("StatusCode")
        except (requests.exceptions.ConnectionError, requests.exceptions.ReadTimeout):
            timed_out = True
            with contextlib.suppress(docker.errors.APIError):
                container.kill()
        stdout = container.logs(stdout=True, stderr=False).decode("utf-8", "replace")
        stderr = container.logs(stdout=False, stderr=True).decode("utf-8", "replace")
    finally:
        container.remove(force=True)
    return ContainerRun(exit_code, stdout, stderr, timed_out)


def leftover_containers(client) -> list[str]:
    """Names of this session's containers that still exist."""
    filters = {"label": [f"{key}={value}" for key, value in LABELS.items()]}
    return [c.name for c in client.containers.list(all=True, filters=filters)]


def make_site_dir() -> str:
    """A world-readable temp dir (not named ``gvisor-magic-*``: the leak check owns those)."""
    base = tempfile.mkdtemp(prefix="gvm-incontainer-")
    os.chmod(base, 0o755)
    return base
