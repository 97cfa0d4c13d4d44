"""The hostile-probe harness: every probe on every backend, one-shot (a fresh sandbox per
call), reused (repeated one-shot calls in the warm sandbox the pool keeps for them) and in a
warm session.

A probe runs something an attacker would try and then decides, from evidence
gathered on the host, whether it got through. ``Probe.verdict`` (tests/support/probes.py)
records that (``blocked`` or ``LEAKED``) in the test's ``user_properties``, which
``scripts/security_report.py`` turns into its table. A leak under gVisor
(runsc, Docker) fails the test. On the subprocess backend leaks are the
expected truth: they are recorded, and the test asserts that every result
said ``isolated=False``. Probes that would hurt the host (bombs, mounts,
killing processes) never run on the subprocess backend; they are recorded as
``n/a`` with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from support.probes import CANARY_ARG, CASES, PYTHON, Probe, sandbox_left, tagged_processes

from gvisor_magic import Limits
from gvisor_magic.warm import POOL


def pytest_configure(config):
    config.addinivalue_line("markers", "limits(**kw): the Limits a security probe runs with")


@pytest.fixture(params=CASES, ids=[f"{b}-{f}" for b, f in CASES])
def probe(request, tmp_path) -> Iterator[Probe]:
    """A probe bound to one backend and flavour; checks the host afterwards."""
    backend, flavour = request.param
    if backend != "subprocess":
        request.getfixturevalue(f"{backend}_works")
    workdir = tmp_path / "work"
    workdir.mkdir()
    marker = request.node.get_closest_marker("limits")
    limits = Limits(**marker.kwargs) if marker is not None else None
    me = psutil.Process()
    children = {p.pid for p in me.children(recursive=True)}
    instance = Probe(request.node, backend, flavour, workdir, limits)
    try:
        yield instance
    finally:
        if instance.session is not None:
            instance.session.close()
        POOL.reset()  # the reused flavour's sandbox: it must go when the pool lets it go
        strays = tagged_processes(instance.tag)
        for process in strays:
            with contextlib.suppress(psutil.Error):
                process.kill()
    instance.finish()
    # The host is unchanged: no process of the probe survives, no new child of
    # ours is left, and the sandbox (one-shot, session or container) is gone.
    assert not strays, f"processes of the probe survived: {[p.pid for p in strays]}"
    new_children = [p for p in me.children(recursive=True) if p.pid not in children
                    and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                    and not any(CANARY_ARG in part for part in p.cmdline())]
    assert not new_children, f"children left: {[p.cmdline() for p in new_children]}"
    left = sandbox_left(instance.sandbox_ids)
    assert not left, f"the sandbox is not gone: {left}"
    if not instance.isolated:
        assert all(not r.isolated for r in instance.results)


@pytest.fixture
def outside(tmp_path) -> Path:
    """A host directory next to the working dir, not mounted: holds a canary secret."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "secret.txt").write_text("CANARY-OUTSIDE-SECRET\n")
    return directory


@pytest.fixture
def host_canary_process() -> Iterator[tuple[psutil.Process, str]]:
    """A host process holding a secret in its environment and command line (a Jupyter
    server with its token, say); it must still be there, untouched, afterwards."""
    secret = f"CANARY-TOKEN-{uuid.uuid4().hex}"
    proc = subprocess.Popen(
        [PYTHON, "-c", "import sys, time; time.sleep(600)", f"{CANARY_ARG}{secret}"],
        env={"PATH": os.environ.get("PATH", ""), "JUPYTERHUB_API_TOKEN": secret,
             "AWS_SECRET_ACCESS_KEY": secret}, stdin=subprocess.DEVNULL)
    try:
        yield psutil.Process(proc.pid), secret
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture
def service_account_token() -> Iterator[str]:
    """A Kubernetes service-account token on the host, as a pod has one."""
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    created: list[Path] = []
    secret = f"CANARY-K8S-{uuid.uuid4().hex}"
    for parent in reversed(path.parents):
        if not parent.exists():
            try:
                parent.mkdir()
            except OSError as exc:
                pytest.skip(f"cannot create {parent} on the host ({exc}): not root")
            created.append(parent)
    if path.exists():
        secret = path.read_text()  # someone's real (or another run's) token: still a secret
    else:
        path.write_text(secret)
        created.append(path)
    try:
        yield secret
    finally:
        for item in reversed(created):
            with contextlib.suppress(OSError):
                item.unlink() if item.is_file() else item.rmdir()


@pytest.fixture
def host_scratch() -> Iterator[Path]:
    """A directory on the host outside every sandbox mount (not under TMPDIR)."""
    directory = Path(tempfile.mkdtemp(prefix="gvm-probe-", dir="/var/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
